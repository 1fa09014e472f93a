//! Importing: release the export, wait for Pathling's one import slot, submit `$import` with exactly
//! the files this run staged, poll `$job`, and accept its result only when it lists every input.

use std::collections::BTreeSet;

use tokio::sync::watch;

use super::names::StagedName;
use super::policy::{Attempt, Peer};
use super::{Engine, Failure, Memory, Next, Reason, now};
use crate::api::{BulkExportRunStatus, Phase};
use crate::fhir::class::{Class, classify};
use crate::fhir::retry::rules;
use crate::pathling::{ImportInput, ImportResult, JobPoll, PnpRequest, Submitted};

/// `$job` answers "unknown job" this often in a row before the run fails (Pathling keeps jobs in
/// memory: one loss is a restart, a loss every time is a broken Pathling or a wrong URL).
pub const MAX_LOST_JOBS: u32 = match rules::LOST_JOB.tries {
    Some(n) => n - 1,
    None => 0,
};

impl Engine {
    /// Releases the export on the source (best effort): single-export servers need the slot, and the
    /// files are ours now.
    pub(super) async fn release_export(&self, st: &mut BulkExportRunStatus, mem: &mut Memory) {
        if let Some(url) = &st.export_status_url
            && !st.export_released
            && let Err(e) = self.setup.source.release(url).await
        {
            tracing::warn!(run = %self.id, error = %e, "could not release the export on the source");
        }
        st.export_released = true;
        mem.source_lock = None;
    }

    /// The files this run staged, as import inputs — checked against what the transfer counted, so a
    /// staging area emptied by someone else is an error, never "nothing to import".
    async fn staged_inputs(&self, st: &BulkExportRunStatus) -> Result<Vec<ImportInput>, Failure> {
        let Some(staging) = &self.setup.staging else { return Ok(vec![]) };
        let lost = |m: String| Failure::new(Reason::ImportFailed, m);
        staging.claim(&self.uid).await.map_err(|e| lost(e.to_string()))?;
        let names = staging.list().await.map_err(|e| lost(format!("listing staged files: {e}")))?;
        let parsed: Vec<StagedName> = names.iter().filter_map(|n| StagedName::parse(n)).collect();
        let expected = st.files.as_ref().map(|f| f.staged).unwrap_or(0);
        if parsed.len() as i64 != expected {
            return Err(lost(format!(
                "the staging area holds {} of the {expected} files this run staged; something else removed or added files. \
                 Nothing was imported; the next run exports again",
                parsed.len()
            )));
        }
        Ok(parsed
            .into_iter()
            .filter_map(|n| match &n {
                StagedName::Output { type_, .. } => {
                    Some(ImportInput { resource_type: type_.clone(), url: staging.pathling_url(&n.file_name()) })
                }
                StagedName::Deleted { .. } => None,
            })
            .collect())
    }

    /// A finished import: counted only when it is the import of every staged file. Pathling 3
    /// lists each input it read; Pathling 7 lists none, so its import is taken as the whole request
    /// it answered — and read back by the verification, not here.
    async fn imported(
        &self,
        st: &mut BulkExportRunStatus,
        mem: &mut Memory,
        result: ImportResult,
    ) -> Result<Next, Failure> {
        mem.lost_jobs = 0;
        mem.reset_polls();
        if self.setup.staging.is_some() && result.lists_inputs {
            let inputs = self.staged_inputs(st).await?;
            let listed: BTreeSet<&str> = result.input_urls.iter().map(String::as_str).collect();
            let missing: Vec<&str> = inputs.iter().map(|i| i.url.as_str()).filter(|u| !listed.contains(u)).collect();
            if !missing.is_empty() {
                return Err(Failure::new(
                    Reason::ImportFailed,
                    format!(
                        "Pathling's import result does not list {} of the {} staged files (first: {}); nothing is counted as imported",
                        missing.len(),
                        inputs.len(),
                        crate::text::redact_str(missing[0])
                    ),
                ));
            }
        }
        st.import_job_url = None;
        st.poll_attempts = 0;
        st.progress = Some("import complete".into());
        st.message = Some("import complete".into());
        mem.pathling_lock = None;
        st.phase = Phase::Deleting;
        Ok(Next::Continue)
    }

    /// Importing: one submit or one poll.
    pub(super) async fn import(
        &self,
        st: &mut BulkExportRunStatus,
        mem: &mut Memory,
        progress: &watch::Sender<BulkExportRunStatus>,
    ) -> Result<Next, Failure> {
        let pnp = self.setup.kind == super::resolve::RunKind::PingAndPull;
        if !pnp && !st.export_released {
            self.release_export(st, mem).await;
            return Ok(Next::Continue);
        }
        if mem.pathling_lock.is_none() {
            let key = format!("pathling:{}", self.setup.pathling_key);
            mem.pathling_lock = Some(self.queue(st, progress, &key, 1, "Pathling's one import slot").await);
        }
        let pathling = &self.setup.pathling;
        let Some(job) = st.import_job_url.clone() else {
            let submitted = if pnp {
                if st.kickoff_time.is_none() {
                    st.kickoff_time = Some(now());
                }
                st.phase = Phase::Importing;
                let req = PnpRequest {
                    export_url: self.setup.source_url.clone(),
                    save_mode: self.setup.save_mode.clone(),
                    types: self.setup.export.types.clone(),
                    since: self.setup.export.since.clone(),
                    type_filters: self.setup.export.type_filters.clone(),
                    elements: self.setup.export.elements.clone(),
                };
                pathling.import_pnp(&req).await.map(Submitted::Job)
            } else {
                let inputs = self.staged_inputs(st).await?;
                if inputs.is_empty() {
                    st.message = Some("the export had no resources: nothing to import".into());
                    mem.pathling_lock = None;
                    st.phase = Phase::Deleting;
                    return Ok(Next::Continue);
                }
                pathling.import(&inputs, &self.setup.save_mode).await
            };
            return match submitted {
                Ok(Submitted::Done(result)) => {
                    mem.streaks.ok();
                    self.imported(st, mem, result).await
                }
                Ok(Submitted::Job(job_url)) => {
                    mem.streaks.ok();
                    st.import_job_url = Some(job_url);
                    st.queue_position = None;
                    st.message = Some("import submitted to Pathling".into());
                    // Pathling holds its one import slot meanwhile: look early
                    mem.reset_polls();
                    Ok(Next::Wait(self.poll_wait(st, mem, None, self.setup.values.target.max_poll)))
                }
                Err(e) => {
                    let a = Attempt {
                        what: if pnp { "Pathling $import-pnp" } else { "Pathling $import" },
                        peer: Peer::Target,
                        reason: Reason::ImportFailed,
                        first_contact: !pathling.http().has_answered(),
                    };
                    self.on_error(st, mem, a, &e)
                }
            };
        };
        match pathling.poll_job(&job).await {
            Ok(JobPoll::Running { progress, wait }) => {
                mem.streaks.ok();
                st.progress = Some(format!("import: {}", progress.unwrap_or_else(|| "running".into())));
                st.message = Some("Pathling is importing".into());
                Ok(Next::Wait(self.poll_wait(st, mem, wait, self.setup.values.target.max_poll)))
            }
            Ok(JobPoll::Done(result)) => {
                mem.streaks.ok();
                self.imported(st, mem, result).await
            }
            Ok(JobPoll::Lost) => {
                mem.lost_jobs += 1;
                st.import_job_url = None;
                if mem.lost_jobs > MAX_LOST_JOBS {
                    return Err(Failure::new(
                        Reason::ImportFailed,
                        format!(
                            "Pathling answered \"unknown job\" for the import {} times in a row; its jobs live in memory: is it restarting, or does spec.target.url reach more than one Pathling?",
                            mem.lost_jobs
                        ),
                    ));
                }
                let wait = rules::LOST_JOB.wait(mem.lost_jobs);
                st.message = Some(format!(
                    "Pathling no longer knows the import job (restarted?); submitting again ({}/{MAX_LOST_JOBS})",
                    mem.lost_jobs
                ));
                Ok(Next::Wait(self.scaled(wait)))
            }
            Err(e) => {
                if classify(&e) == Class::Busy {
                    // Pathling refused this job for another import: forget it so that the
                    // resubmission is not coalesced into the refused one
                    let _ = pathling.delete_job(&job).await;
                    st.import_job_url = None;
                }
                let a = Attempt {
                    what: "polling Pathling's import job",
                    peer: Peer::Target,
                    reason: Reason::ImportFailed,
                    first_contact: false,
                };
                self.on_error(st, mem, a, &e)
            }
        }
    }
}
