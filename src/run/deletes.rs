//! Deleting: the manifest's `deleted[]` Bundles, staged during the transfer, replayed as DELETEs on
//! Pathling after the import (so a resource deleted and re-created in the window ends up present).
//! Every reference is checked against FHIR's grammar first; a 404 counts as done.

use futures::{StreamExt, TryStreamExt};
use serde::Deserialize;

use super::names::StagedName;
use super::policy::{Attempt, Peer};
use super::{Engine, Failure, Memory, Next, Reason};
use crate::api::BulkExportRunStatus;
use crate::fhir::client::Error as HttpError;
use crate::fhir::ids;
use crate::fhir::ndjson::{Line, Lines};
use crate::pathling::PathlingClient;
use crate::staging::{Staging, StagingError};

/// Longest `deleted[]` Bundle line read.
pub const BUNDLE_LINE_MAX: usize = 4 << 20;
/// DELETEs sent at once.
const PARALLEL: usize = 4;

#[derive(Deserialize)]
struct Bundle {
    #[serde(default)]
    entry: Vec<Entry>,
}

#[derive(Deserialize)]
struct Entry {
    #[serde(default)]
    request: Option<EntryRequest>,
}

#[derive(Deserialize)]
struct EntryRequest {
    #[serde(default)]
    method: String,
    #[serde(default)]
    url: String,
}

/// What a replay did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Replayed {
    /// DELETEs applied (or already absent).
    pub applied: i64,
    /// Entries that were not a well-formed `Type/id` (skipped, never sent).
    pub malformed: i64,
}

/// Why a replay stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("{0}")]
    Http(#[from] HttpError),
    #[error("{0}")]
    Staging(#[from] StagingError),
    #[error("{0}")]
    Malformed(String),
}

/// Replays one staged `deleted[]` file as DELETEs on Pathling.
pub async fn replay(staging: &dyn Staging, name: &str, pathling: &PathlingClient) -> Result<Replayed, ReplayError> {
    let stream = staging.read(name).await?;
    let mut lines = Lines::new(stream, BUNDLE_LINE_MAX);
    let mut r = Replayed::default();
    let mut batch = vec![];
    while let Some(line) = lines.next().await {
        let text = match line? {
            Line::Text(t) => t,
            Line::TooLong(n) => {
                return Err(ReplayError::Malformed(format!(
                    "{name}: a Bundle line of {n} bytes is larger than fhirsync reads"
                )));
            }
        };
        let b: Bundle = serde_json::from_slice(&text)
            .map_err(|e| ReplayError::Malformed(format!("{name}: a line is not a JSON Bundle: {e}")))?;
        for req in b.entry.into_iter().filter_map(|e| e.request) {
            if !req.method.eq_ignore_ascii_case("DELETE") {
                continue;
            }
            match ids::reference(&req.url) {
                Some(target) => batch.push(target),
                None => r.malformed += 1,
            }
        }
        if batch.len() >= 1000 {
            r.applied += delete_all(pathling, std::mem::take(&mut batch)).await?;
        }
    }
    r.applied += delete_all(pathling, batch).await?;
    Ok(r)
}

/// Deletes resources on Pathling, a few at a time; returns how many.
pub async fn delete_all(pathling: &PathlingClient, targets: Vec<(String, String)>) -> Result<i64, HttpError> {
    let n = targets.len() as i64;
    futures::stream::iter(targets)
        .map(|(t, id)| async move { pathling.delete_resource(&t, &id).await })
        .buffer_unordered(PARALLEL)
        .try_for_each(|()| async { Ok(()) })
        .await
        .map(|()| n)
}

impl Engine {
    /// Deleting: replays every staged `deleted[]` file, then finishes the run.
    pub(super) async fn deletes(&self, st: &mut BulkExportRunStatus, mem: &mut Memory) -> Result<Next, Failure> {
        let mut total = Replayed::default();
        if self.setup.apply_deletes
            && let Some(staging) = &self.setup.staging
        {
            let names = staging
                .list()
                .await
                .map_err(|e| Failure::new(Reason::ImportFailed, format!("listing staged files: {e}")))?;
            for name in names.iter().filter(|n| matches!(StagedName::parse(n), Some(StagedName::Deleted { .. }))) {
                match replay(staging.as_ref(), name, &self.setup.pathling).await {
                    Ok(r) => {
                        total.applied += r.applied;
                        total.malformed += r.malformed;
                    }
                    Err(ReplayError::Http(e)) => {
                        let a = Attempt {
                            what: "replaying deletions on Pathling",
                            peer: Peer::Target,
                            reason: Reason::ImportFailed,
                            first_contact: false,
                        };
                        return self.on_error(st, mem, a, &e);
                    }
                    Err(e) => return Err(Failure::new(Reason::ImportFailed, format!("replaying deletions: {e}"))),
                }
            }
            mem.streaks.ok();
        }
        st.deleted = total.applied;
        if total.malformed > 0 {
            tracing::warn!(run = %self.id, malformed = total.malformed, "deleted[] entries that are not Type/id were skipped");
        }
        self.finish(st, mem, total.malformed).await;
        Ok(Next::Done)
    }
}
