//! A verification run (trigger Verify) after its source export of ids completed: Verifying reads the
//! source's ids from that export and Pathling's from Pathling's own `$export` (`_elements=id`), sorts
//! both in bounded memory (spilling to the staging area) and compares them; Repairing deletes from
//! Pathling the extras the source confirms gone. Nothing is imported; the watermark never moves.
//!
//! Progress lives in [`VerifyMemory`]: a retried step goes on where it stopped; a restarted process
//! starts the verification again (its source export is re-read while it is not released).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::deletes::delete_all;
use super::policy::{Attempt, Peer};
use super::presence::Presence;
use super::{Engine, Failure, Memory, Next, Reason, now};
use crate::api::drift::IdRead;
use crate::api::{BulkExportRunStatus, Phase};
use crate::fhir::bulk::{BulkClient, OutputFile};
use crate::fhir::client::Error as HttpError;
use crate::fhir::ndjson::{Line, Lines};
use crate::pathling::ExportPoll;
use crate::staging::{Staging, StagingError};
use crate::verify::compare::{EXTRAS, compare};
use crate::verify::ids;
use crate::verify::sort::{BUDGET, Sorted, Sorter};

/// Longest NDJSON line read for its id (a full resource when the source ignored `_elements`).
pub const ID_LINE_MAX: usize = 8 << 20;
/// Extras checked and deleted at a time.
const REPAIR_BATCH: usize = 1000;

/// A verification's progress in this process.
#[derive(Default)]
pub struct VerifyMemory {
    /// The source refused `_elements`: its ids come from a full export.
    pub(super) full_export: bool,
    source: Option<Sorted>,
    unreadable: i64,
    pathling_job: Option<String>,
    pathling: Option<Sorted>,
    lost_jobs: u32,
}

/// Why reading an id file stopped.
enum ReadError {
    Http(HttpError),
    Staging(StagingError),
}

/// Reads every file's lines into `sorter` as keys; returns the unreadable lines. A file that breaks
/// midway is read again from its start (the sorter drops the duplicates).
async fn read_ids(
    client: &BulkClient,
    files: &[OutputFile],
    requires_token: bool,
    sorter: &mut Sorter,
    pending_after: Option<jiff::Timestamp>,
    max_spill: u64,
    scale: f64,
) -> Result<i64, Failure> {
    let mut unreadable = 0;
    for f in files {
        let mut failures = crate::fhir::retry::rules::FILE.start();
        loop {
            let r: Result<i64, ReadError> = async {
                let stream = client.download(&f.url, requires_token).await.map_err(ReadError::Http)?;
                let mut lines = Lines::new(Box::pin(stream), ID_LINE_MAX);
                let mut bad = 0;
                while let Some(line) = lines.next().await {
                    match line.map_err(ReadError::Http)? {
                        Line::Text(t) => match ids::key(&t, pending_after) {
                            Some(k) => sorter.push(&k).await.map_err(ReadError::Staging)?,
                            None => bad += 1,
                        },
                        Line::TooLong(_) => bad += 1,
                    }
                }
                Ok(bad)
            }
            .await;
            if sorter.spilled > max_spill {
                return Err(Failure::new(
                    Reason::VerifyFailed,
                    format!("the sorted ids take more than spec.limits.maxRunSize ({max_spill} bytes)"),
                ));
            }
            match r {
                Ok(bad) => {
                    unreadable += bad;
                    break;
                }
                Err(ReadError::Staging(e)) => {
                    return Err(Failure::new(Reason::VerifyFailed, format!("spilling sorted ids: {e}")));
                }
                Err(ReadError::Http(e)) => {
                    let retry = crate::fhir::class::classify(&e).may_pass();
                    match failures.failed(None).filter(|_| retry) {
                        Some(wait) => tokio::time::sleep(wait.mul_f64(scale)).await,
                        None => {
                            return Err(Failure::new(
                                Reason::VerifyFailed,
                                format!("reading ids from {} ({}): {e}", crate::text::redact_str(&f.url), f.type_),
                            ));
                        }
                    }
                }
            }
        }
    }
    Ok(unreadable)
}

impl Engine {
    fn spill_area(&self) -> Result<Arc<dyn Staging>, Failure> {
        self.setup.staging.clone().ok_or_else(|| Failure::new(Reason::InvalidSpec, "no area to spill sorted ids to"))
    }

    /// Verifying: the source's ids, then Pathling's, then the comparison.
    pub(super) async fn verify(
        &self,
        st: &mut BulkExportRunStatus,
        mem: &mut Memory,
        progress: &watch::Sender<BulkExportRunStatus>,
    ) -> Result<Next, Failure> {
        let area = self.spill_area()?;
        area.claim(&self.uid).await.map_err(|e| Failure::new(Reason::VerifyFailed, e.to_string()))?;
        let opts = self.setup.kind.verify().cloned().unwrap_or_default();
        let pending_after = opts.pending_after.as_ref().map(|t| t.0);
        if mem.verify.source.is_none() {
            if st.export_released {
                // resumed after the source's export was released: export the ids again
                st.phase = Phase::Pending;
                st.export_status_url = None;
                st.kickoff_time = None;
                st.export_released = false;
                return Ok(Next::Continue);
            }
            let m = match self.manifest(st, mem).await? {
                Ok(m) => m,
                Err(next) => return Ok(next),
            };
            progress.send_modify(|s| s.progress = Some(format!("reading the source's ids: {} files", m.output.len())));
            let mut sorter = Sorter::new(area.clone(), "source", BUDGET);
            let bad = read_ids(
                &self.setup.source,
                &m.output,
                m.requires_access_token,
                &mut sorter,
                pending_after,
                self.setup.values.max_run_bytes,
                self.backoff_scale,
            )
            .await?;
            let sorted = sorter.finish().await.map_err(|e| Failure::new(Reason::VerifyFailed, e.to_string()))?;
            st.resource_count = Some(sorted.keys as i64);
            mem.verify.unreadable += bad;
            mem.verify.source = Some(sorted);
            self.release_export(st, mem).await;
        }
        if mem.verify.pathling.is_none() {
            let pathling = &self.setup.pathling;
            let Some(job) = mem.verify.pathling_job.clone() else {
                return match pathling.export_ids(&self.setup.export.types).await {
                    Ok(job) => {
                        mem.streaks.ok();
                        mem.verify.pathling_job = Some(job);
                        st.message = Some("Pathling is exporting its ids".into());
                        mem.reset_polls();
                        Ok(Next::Wait(self.poll_wait(st, mem, None, self.setup.values.target.max_poll)))
                    }
                    Err(e) => {
                        let a = Attempt {
                            what: "Pathling $export of ids",
                            peer: Peer::Target,
                            reason: Reason::VerifyFailed,
                            first_contact: !pathling.http().has_answered(),
                        };
                        self.on_error(st, mem, a, &e)
                    }
                };
            };
            let m = match pathling.poll_export(&job).await {
                Ok(ExportPoll::Running { progress: p, wait }) => {
                    mem.streaks.ok();
                    st.progress = Some(format!("Pathling export: {}", p.unwrap_or_else(|| "running".into())));
                    return Ok(Next::Wait(self.poll_wait(st, mem, wait, self.setup.values.target.max_poll)));
                }
                Ok(ExportPoll::Lost) => {
                    mem.verify.pathling_job = None;
                    mem.verify.lost_jobs += 1;
                    if mem.verify.lost_jobs > super::MAX_LOST_JOBS {
                        return Err(Failure::new(
                            Reason::VerifyFailed,
                            "Pathling answered \"unknown job\" for its export again and again; is it restarting?",
                        ));
                    }
                    return Ok(Next::Wait(self.scaled(Duration::from_secs(2))));
                }
                Ok(ExportPoll::Done(m)) => m,
                Err(e) => {
                    let a = Attempt {
                        what: "polling Pathling's export",
                        peer: Peer::Target,
                        reason: Reason::VerifyFailed,
                        first_contact: false,
                    };
                    return self.on_error(st, mem, a, &e);
                }
            };
            mem.streaks.ok();
            mem.reset_polls();
            st.poll_attempts = 0;
            if !m.error.is_empty() {
                return Err(Failure::new(
                    Reason::VerifyFailed,
                    format!("Pathling's export reported {} error files; nothing was compared", m.error.len()),
                ));
            }
            progress.send_modify(|s| s.progress = Some(format!("reading Pathling's ids: {} files", m.output.len())));
            let mut sorter = Sorter::new(area.clone(), "pathling", BUDGET);
            let bad = read_ids(
                &pathling.files(),
                &m.output,
                true,
                &mut sorter,
                None,
                self.setup.values.max_run_bytes,
                self.backoff_scale,
            )
            .await?;
            let sorted = sorter.finish().await.map_err(|e| Failure::new(Reason::VerifyFailed, e.to_string()))?;
            mem.verify.unreadable += bad;
            mem.verify.pathling = Some(sorted);
            if let Err(e) = pathling.delete_job(&job).await {
                tracing::warn!(run = %self.id, error = %e, "could not remove Pathling's export job");
            }
        }
        // both sides read: compare
        let (Some(src), Some(pl)) = (&mem.verify.source, &mem.verify.pathling) else {
            return Ok(Next::Continue);
        };
        progress.send_modify(|s| s.progress = Some("comparing ids".into()));
        let staging_err = |e: StagingError| Failure::new(Reason::VerifyFailed, format!("comparing ids: {e}"));
        let mut a = src.open().await.map_err(staging_err)?;
        let mut b = pl.open().await.map_err(staging_err)?;
        let mut drift = compare(&mut a, &mut b, area.as_ref()).await.map_err(staging_err)?;
        drift.verified_at = Some(now());
        drift.source_read = Some(if mem.verify.full_export { IdRead::FullExport } else { IdRead::Elements });
        drift.unreadable = mem.verify.unreadable;
        let (_, extra, _) = drift.totals();
        if extra > 0 {
            if !opts.repair {
                drift.not_repaired = Some("spec.verify.repair is false".into());
            } else if !opts.shared_with.is_empty() {
                drift.not_repaired = Some(format!(
                    "Pathling also receives these types from BulkExportSync {}: the extras may be theirs",
                    opts.shared_with.join(", ")
                ));
            }
        }
        let repair = extra > 0 && drift.not_repaired.is_none();
        st.drift = Some(drift);
        if repair {
            st.phase = Phase::Repairing;
            st.message = Some(format!("deleting up to {extra} extra resources from Pathling"));
            return Ok(Next::Continue);
        }
        self.finish_verify(st, mem).await;
        Ok(Next::Done)
    }

    /// Repairing: deletes the extras the source confirms gone; keeps the others.
    pub(super) async fn repair(
        &self,
        st: &mut BulkExportRunStatus,
        mem: &mut Memory,
        progress: &watch::Sender<BulkExportRunStatus>,
    ) -> Result<Next, Failure> {
        let area = self.spill_area()?;
        let stream = area.read(EXTRAS).await.map_err(|e| {
            Failure::new(
                Reason::VerifyFailed,
                format!("the list of extras is gone ({e}); the next verification finds them again"),
            )
        })?;
        let mut lines = Lines::new(stream, crate::verify::sort::KEY_MAX);
        let mut presence = Presence::default();
        let (mut deleted, mut kept) = (0i64, 0i64);
        let mut batch: Vec<(String, String)> = vec![];
        let mut done = false;
        while !done {
            match lines.next().await {
                Some(Ok(Line::Text(t))) => {
                    let (ty, id, _) = ids::split(&t);
                    batch.push((String::from_utf8_lossy(ty).into_owned(), String::from_utf8_lossy(id).into_owned()));
                }
                Some(Ok(Line::TooLong(_))) => {}
                Some(Err(e)) => return Err(Failure::new(Reason::VerifyFailed, format!("reading the extras: {e}"))),
                None => done = true,
            }
            if batch.len() < REPAIR_BATCH && !done {
                continue;
            }
            let mut by_type: std::collections::BTreeMap<String, Vec<String>> = Default::default();
            for (t, id) in batch.drain(..) {
                by_type.entry(t).or_default().push(id);
            }
            for (t, ids) in by_type {
                let split = match presence.check(self.setup.source.http(), &t, &ids).await {
                    Ok(s) => s,
                    Err(e) => {
                        let a = Attempt {
                            what: "checking extras at the source",
                            peer: Peer::Source,
                            reason: Reason::VerifyFailed,
                            first_contact: false,
                        };
                        return self.on_error(st, mem, a, &e);
                    }
                };
                kept += (split.alive.len() + split.unknown.len()) as i64;
                let targets: Vec<(String, String)> = split.absent.into_iter().map(|id| (t.clone(), id)).collect();
                match delete_all(&self.setup.pathling, targets).await {
                    Ok(n) => deleted += n,
                    Err(e) => {
                        let a = Attempt {
                            what: "deleting extras from Pathling",
                            peer: Peer::Target,
                            reason: Reason::VerifyFailed,
                            first_contact: false,
                        };
                        return self.on_error(st, mem, a, &e);
                    }
                }
                progress.send_modify(|s| s.progress = Some(format!("repair: {deleted} extras deleted")));
            }
        }
        mem.streaks.ok();
        if let Some(d) = st.drift.as_mut() {
            d.deleted = deleted;
            d.kept = kept;
            let (missing, _, _) = d.totals();
            d.in_sync = missing == 0 && kept == 0;
        }
        self.finish_verify(st, mem).await;
        Ok(Next::Done)
    }

    /// The end of a verification: staging removed, the outcome in the message.
    async fn finish_verify(&self, st: &mut BulkExportRunStatus, mem: &mut Memory) {
        if let Some(s) = &self.setup.staging
            && let Err(e) = s.remove_all(&self.uid).await
        {
            tracing::warn!(run = %self.id, error = %e, "could not remove the spilled ids");
        }
        mem.verify = VerifyMemory::default();
        mem.source_lock = None;
        let msg = match &st.drift {
            Some(d) => {
                let mut m = d.summary();
                if d.deleted > 0 {
                    m.push_str(&format!("; deleted {} extras from Pathling", d.deleted));
                }
                if d.kept > 0 {
                    m.push_str(&format!(
                        "; kept {} extras the source still has (outside the export's selection) or could not confirm gone",
                        d.kept
                    ));
                }
                if let Some(n) = &d.not_repaired {
                    m.push_str(&format!("; extras not deleted: {n}"));
                }
                m
            }
            None => "verified".into(),
        };
        super::finish::mark_succeeded(st, "Verified", &msg, None);
    }
}
