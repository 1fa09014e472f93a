//! Deleting: the deletions of the run's window applied on Pathling after its import (so a resource
//! deleted and re-created in the window ends up present). Where they come from, best first: the
//! manifest's `deleted[]` (staged during the transfer); else the source's history
//! (`_history?_since=`, per synced type or system-level, as the source allows); else nowhere — said in
//! the status and as a `DeletionsUnavailable` degradation. Before a deletion is applied the source is
//! asked whether the resource exists again (a search by `_id`, 50 at a time); one that does is kept.
//! Every reference is checked against FHIR's grammar first; a 404 from Pathling counts as done.

use std::collections::{BTreeMap, BTreeSet};

use futures::{StreamExt, TryStreamExt};
use tokio::sync::watch;

use super::names::StagedName;
use super::policy::{self, Attempt, Decision, Peer};
use super::presence::Presence;
use super::{Engine, Failure, Memory, Next, Reason};
use crate::api::conditions::{get_condition, set_condition, types};
use crate::api::{BulkExportRunStatus, DeletionSource};
use crate::fhir::bundle::Page;
use crate::fhir::class::{Class, classify};
use crate::fhir::client::Error as HttpError;
use crate::fhir::history::{self, Scope, Walk};
use crate::fhir::ndjson::{Line, Lines};
use crate::pathling::PathlingClient;
use crate::staging::StagingError;

/// Longest `deleted[]` Bundle line read.
pub const BUNDLE_LINE_MAX: usize = 4 << 20;
/// Most entries read from one `deleted[]` Bundle line.
const BUNDLE_ENTRIES_MAX: usize = 100_000;
/// DELETEs sent at once.
const PARALLEL: usize = 4;
/// Deletions gathered before they are checked and applied.
const BATCH: usize = 1000;

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

/// What applying deletions did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    /// DELETEs applied on Pathling (or already absent there).
    pub applied: i64,
    /// Listed as deleted but present at the source again: kept.
    pub recreated: i64,
    /// Applied without a check, because the source cannot say whether they exist.
    pub unchecked: i64,
    /// Entries that were not a well-formed `Type/id` (skipped, never sent).
    pub malformed: i64,
}

/// Why applying deletions stopped.
#[derive(Debug)]
enum Stop {
    Http(Peer, HttpError),
    Staging(StagingError),
    /// The source sent something unreadable (a `deleted[]` line, a history page).
    Malformed(String),
}

/// Applies batches of deletions: checks them at the source, deletes the absent ones on Pathling.
struct Applier<'a> {
    engine: &'a Engine,
    presence: Presence,
    tally: Tally,
    /// The synced types (empty: all).
    only: BTreeSet<String>,
    /// Where the deletions are being read from.
    source: Option<DeletionSource>,
    /// Pathling cannot delete single resources (7.x): confirmed deletions are counted per type here
    /// instead of sent.
    cannot_delete: bool,
    unsent: BTreeMap<String, i64>,
}

impl Applier<'_> {
    async fn apply(&mut self, refs: Vec<(String, String)>) -> Result<(), Stop> {
        let mut by_type: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (t, id) in refs {
            if self.only.is_empty() || self.only.contains(&t) {
                by_type.entry(t).or_default().insert(id);
            }
        }
        let source = self.engine.setup.source.http();
        for (t, ids) in by_type {
            let ids: Vec<String> = ids.into_iter().collect();
            let split = self.presence.check(source, &t, &ids).await.map_err(|e| Stop::Http(Peer::Source, e))?;
            self.tally.recreated += split.alive.len() as i64;
            self.tally.unchecked += split.unknown.len() as i64;
            let targets: Vec<(String, String)> =
                split.absent.into_iter().chain(split.unknown).map(|id| (t.clone(), id)).collect();
            if self.cannot_delete {
                if !targets.is_empty() {
                    *self.unsent.entry(t.clone()).or_default() += targets.len() as i64;
                }
                continue;
            }
            self.tally.applied +=
                delete_all(&self.engine.setup.pathling, targets).await.map_err(|e| Stop::Http(Peer::Target, e))?;
        }
        Ok(())
    }

    /// Applies one staged `deleted[]` file.
    async fn replay(&mut self, name: &str) -> Result<(), Stop> {
        let Some(staging) = &self.engine.setup.staging else { return Ok(()) };
        let stream = staging.read(name).await.map_err(Stop::Staging)?;
        let mut lines = Lines::new(stream, BUNDLE_LINE_MAX);
        let mut batch = vec![];
        while let Some(line) = lines.next().await {
            let text = match line.map_err(Stop::Staging)? {
                Line::Text(t) => t,
                Line::TooLong(n) => {
                    return Err(Stop::Malformed(format!(
                        "{name}: a Bundle line of {n} bytes is larger than fhirsync reads"
                    )));
                }
            };
            let page = Page::parse_bounded::<BUNDLE_ENTRIES_MAX>(&text)
                .map_err(|e| Stop::Malformed(format!("{name}: a line is not a Bundle of deletions: {e}")))?;
            for e in page.entries {
                match e {
                    crate::fhir::bundle::EntryRef::Deleted(t, id) => batch.push((t, id)),
                    _ => self.tally.malformed += 1,
                }
            }
            if batch.len() >= BATCH {
                self.apply(std::mem::take(&mut batch)).await?;
            }
        }
        self.apply(batch).await
    }

    /// Walks one history and applies its deletions page by page.
    async fn history(&mut self, scope: &Scope, since: jiff::Timestamp) -> Result<(), Stop> {
        let http = self.engine.setup.source.http();
        let mut walk = Walk::new(history::first_page(http, scope, since));
        let mut batch = vec![];
        loop {
            let stop = match walk.next_page(http).await {
                Ok(Some(refs)) => {
                    batch.extend(refs);
                    None
                }
                Ok(None) => break,
                Err(HttpError::Protocol { message, .. }) => {
                    Some(Stop::Malformed(format!("the source's history: {message}")))
                }
                Err(e) => Some(Stop::Http(Peer::Source, e)),
            };
            if let Some(stop) = stop {
                // what was read is applied before the walk stops
                self.apply(batch).await?;
                return Err(stop);
            }
            if batch.len() >= BATCH {
                self.apply(std::mem::take(&mut batch)).await?;
            }
        }
        self.apply(batch).await
    }
}

/// Whether an answer means "this server has no such history".
fn no_history(e: &HttpError) -> bool {
    crate::fhir::class::refuses(e, crate::fhir::class::Ask::History)
}

impl Engine {
    /// The histories that hold the window's deletions, as the source's CapabilityStatement allows (a
    /// probe of the system history when it says nothing); `None` when the source has none.
    async fn history_scopes(&self) -> Result<Option<Vec<Scope>>, Stop> {
        let http = self.setup.source.http();
        let types = &self.setup.export.types;
        match crate::fhir::capabilities::read(http).await {
            // the synced types' own histories: a system history also lists every other type's writes
            Ok(c) if !types.is_empty() && types.iter().all(|t| c.has(t, "history-type")) => {
                return Ok(Some(types.iter().map(|t| Scope::Type(t.clone())).collect()));
            }
            Ok(c) if c.system_interactions.contains("history-system") => return Ok(Some(vec![Scope::System])),
            Ok(_) => {}
            Err(e) if matches!(classify(&e), Class::Permanent | Class::Unsupported) => {}
            Err(e) => return Err(Stop::Http(Peer::Source, e)),
        }
        // the CapabilityStatement does not say: ask the system history for one entry
        let mut probe = history::first_page(http, &Scope::System, jiff::Timestamp::now());
        probe.query_pairs_mut().append_pair("_count", "1");
        match Walk::new(probe).next_page(http).await {
            Ok(_) => Ok(Some(vec![Scope::System])),
            Err(e) if no_history(&e) => Ok(None),
            Err(e) => Err(Stop::Http(Peer::Source, e)),
        }
    }

    /// Finds and applies the deletions; returns where they came from.
    async fn find_and_apply(&self, a: &mut Applier<'_>) -> Result<DeletionSource, Stop> {
        if !self.setup.apply_deletes {
            return Ok(DeletionSource::Disabled);
        }
        let mut staged = vec![];
        if let Some(staging) = &self.setup.staging {
            let names = staging.list().await.map_err(Stop::Staging)?;
            staged = names
                .into_iter()
                .filter(|n| matches!(StagedName::parse(n), Some(StagedName::Deleted { .. })))
                .collect();
        }
        if !staged.is_empty() {
            a.source = Some(DeletionSource::Manifest);
            for name in &staged {
                a.replay(name).await?;
            }
            return Ok(DeletionSource::Manifest);
        }
        let Some(since) = self.setup.since else { return Ok(DeletionSource::FullExport) };
        match self.history_scopes().await? {
            Some(scopes) => {
                a.source = Some(DeletionSource::History);
                for s in &scopes {
                    a.history(s, since).await?;
                }
                Ok(DeletionSource::History)
            }
            None => Ok(DeletionSource::Unavailable),
        }
    }

    /// Deleting: finds and applies the window's deletions, then finishes the run.
    pub(super) async fn deletes(
        &self,
        st: &mut BulkExportRunStatus,
        mem: &mut Memory,
        progress: &watch::Sender<BulkExportRunStatus>,
    ) -> Result<Next, Failure> {
        progress.send_modify(|s| s.progress = Some("applying deletions".into()));
        let mut a = Applier {
            engine: self,
            presence: Presence::default(),
            tally: Tally::default(),
            only: self.setup.export.types.iter().cloned().collect(),
            source: None,
            cannot_delete: false,
            unsent: BTreeMap::new(),
        };
        if self.setup.apply_deletes {
            match self.setup.pathling.generation().await {
                Ok(d) => a.cannot_delete = !d.generation.deletes(),
                Err(e) => {
                    let at = Attempt {
                        what: "reading Pathling's generation",
                        peer: Peer::Target,
                        reason: Reason::ImportFailed,
                        first_contact: false,
                    };
                    return self.on_error(st, mem, at, &e);
                }
            }
        }
        let found = self.find_and_apply(&mut a).await;
        let (t, used, unsent) = (a.tally, a.source, std::mem::take(&mut a.unsent));
        let (source, incomplete) = match found {
            Ok(s) => {
                mem.streaks.ok();
                (s, None)
            }
            Err(Stop::Staging(e)) => {
                return Err(Failure::new(Reason::ImportFailed, format!("reading the staged deletions: {e}")));
            }
            Err(Stop::Malformed(m)) => (used.unwrap_or(DeletionSource::History), Some(m)),
            Err(Stop::Http(peer, e)) => {
                let what = match peer {
                    Peer::Source => "reading deletions from the source",
                    Peer::Target => "applying deletions on Pathling",
                };
                let a = Attempt { what, peer, reason: Reason::ImportFailed, first_contact: false };
                match policy::decide(a, &e, &mut mem.streaks) {
                    Decision::Retry { wait, message } => {
                        st.message = Some(message);
                        return Ok(Next::Wait(self.scaled(wait)));
                    }
                    // Pathling refusing is a configuration to fix: the run fails
                    Decision::Fail(f) if peer == Peer::Target => return Err(f),
                    // the source's history is unreadable: what was imported counts, the watermark stays
                    Decision::Fail(f) => (used.unwrap_or(DeletionSource::History), Some(f.message)),
                }
            }
        };
        st.deleted = t.applied;
        st.deletion_source = Some(source);
        st.deletions_incomplete = incomplete.is_some() || !unsent.is_empty();
        if !unsent.is_empty() {
            let n: i64 = unsent.values().sum();
            let per: Vec<String> = unsent.iter().map(|(t, k)| format!("{t}: {k}")).collect();
            degrade(
                st,
                "DeletionsUnsupported",
                &format!(
                    "Pathling Server 7.x has no DELETE: {n} resources deleted at the source ({}) are still in Pathling, and \
                     the watermark does not move past this run's _since until they are gone. To remove them, import those \
                     types in full once with target.saveMode: overwrite and incremental: false; or set \
                     target.applyDeletes: false to keep them",
                    per.join(", ")
                ),
            );
        }
        if t.malformed > 0 {
            tracing::warn!(run = %self.id, malformed = t.malformed, "deletion entries that are not Type/id were skipped");
        }
        if let Some(m) = incomplete {
            degrade(
                st,
                "DeletionsIncomplete",
                &format!(
                    "some deletions could not be read from the source ({m}); those read were applied, and the watermark does not move past this run's _since, so the next run looks again"
                ),
            );
        } else if source == DeletionSource::Unavailable {
            degrade(
                st,
                "DeletionsUnavailable",
                "the source lists no deletions in its manifest and offers no _history: resources deleted there stay in Pathling \
                 until a verification with repair (spec.verify) removes them; set target.applyDeletes: false to silence this",
            );
        }
        let mut phrase = String::new();
        match source {
            DeletionSource::Manifest | DeletionSource::History => {
                phrase.push_str(&format!(
                    ", applied {} deletions (from the {})",
                    t.applied,
                    if source == DeletionSource::Manifest { "manifest's deleted[]" } else { "source's history" }
                ));
                if t.recreated > 0 {
                    phrase.push_str(&format!("; kept {} re-created since", t.recreated));
                }
                if t.malformed > 0 {
                    phrase.push_str(&format!("; skipped {} entries that are not Type/id", t.malformed));
                }
            }
            _ => {}
        }
        self.finish(st, mem, &phrase).await;
        Ok(Next::Done)
    }
}

/// Marks the run Degraded with `reason` (keeping an earlier reason, and adding to its message).
pub(super) fn degrade(st: &mut BulkExportRunStatus, reason: &str, message: &str) {
    let (reason, message) = match get_condition(&st.conditions, types::DEGRADED) {
        Some(d) if d.status == "True" && d.reason != reason => (d.reason.clone(), format!("{} {message}", d.message)),
        _ => (reason.to_string(), message.to_string()),
    };
    if st.reason.is_none() {
        st.reason = Some(reason.clone());
    }
    set_condition(&mut st.conditions, types::DEGRADED, true, &reason, message, None);
}
