//! The end of a run: success, failure, cleanup. The only code that writes a run's outcome.

use std::time::Duration;

use super::{Engine, Failure, Memory, Next, now};
use crate::api::conditions::{get_condition, remove_condition, set_condition, types};
use crate::api::{BulkExportRunStatus, Phase};

/// Longest message kept in a status (the API server has a size limit; peers send long texts).
pub const MESSAGE_MAX: usize = 2048;

/// Marks a run Failed with `f`: phase, reason, message, completion time and the `Failed` condition.
pub fn mark_failed(st: &mut BulkExportRunStatus, f: &Failure) {
    let mut message = f.message.clone();
    crate::text::cut_bytes(&mut message, MESSAGE_MAX);
    st.phase = Phase::Failed;
    st.completion_time = Some(now());
    if st.start_time.is_none() {
        st.start_time = st.completion_time.clone();
    }
    st.duration = duration_of(st);
    st.reason = Some(f.reason.as_str().into());
    st.queue_position = None;
    st.message = Some(message.clone());
    remove_condition(&mut st.conditions, types::COMPLETE);
    set_condition(&mut st.conditions, types::FAILED, true, f.reason.as_str(), message, None);
}

/// Marks a run Succeeded: phase, completion time, the `Complete` condition with `reason` and
/// `summary`, and the message (`summary`, then `more` when there is more to say), bounded.
pub fn mark_succeeded(st: &mut BulkExportRunStatus, reason: &str, summary: &str, more: Option<&str>) {
    st.phase = Phase::Succeeded;
    st.completion_time = Some(now());
    st.duration = duration_of(st);
    st.progress = Some("done".into());
    st.queue_position = None;
    set_condition(&mut st.conditions, types::COMPLETE, true, reason, summary, None);
    let mut full = match more {
        Some(m) => format!("{summary}. {m}"),
        None => summary.to_string(),
    };
    crate::text::cut_bytes(&mut full, MESSAGE_MAX);
    st.message = Some(full);
}

/// The run's length as the printer column shows it (`3m12s`).
pub fn duration_of(st: &BulkExportRunStatus) -> Option<String> {
    let (s, e) = (st.start_time.as_ref()?, st.completion_time.as_ref()?);
    let secs = e.0.duration_since(s.0).as_secs().max(0) as u64;
    Some(crate::api::units::show(Duration::from_secs(secs)))
}

impl Engine {
    /// Succeeded: staged files removed, counts and message recorded (`deletions` says what the
    /// deletion phase did, as a phrase that follows "imported N resources from F files").
    pub(super) async fn finish(&self, st: &mut BulkExportRunStatus, mem: &mut Memory, deletions: &str) {
        if let Some(s) = &self.setup.staging
            && let Err(e) = s.remove_all(&self.uid).await
        {
            tracing::warn!(run = %self.id, error = %e, "could not remove staged files");
        }
        mem.pathling_lock = None;
        mem.source_lock = None;
        st.resource_count = Some(st.resources.values().sum());
        let files = st.files.as_ref().map(|f| f.staged).unwrap_or(0);
        let msg = format!("imported {} resources from {files} files{deletions}", st.resource_count.unwrap_or(0));
        let degraded = get_condition(&st.conditions, types::DEGRADED).filter(|d| d.status == "True");
        let more = degraded.map(|d| d.message.clone());
        mark_succeeded(st, "Succeeded", &msg, more.as_deref());
    }

    /// Failed: cleanup, then the failure recorded.
    pub(super) async fn fail(&self, st: &mut BulkExportRunStatus, mem: &mut Memory, f: Failure) -> Next {
        let left = match tokio::time::timeout(super::CLEANUP_TIMEOUT, self.cleanup(st, mem)).await {
            Ok(left) => left,
            Err(_) => vec!["cleanup timed out".into()],
        };
        if !left.is_empty() {
            tracing::warn!(run = %self.id, left = %left.join("; "), "cleanup after a failed run was incomplete");
        }
        mark_failed(st, &f);
        Next::Done
    }

    /// Best-effort teardown of everything the run holds outside: cancels the export on the source,
    /// cancels the Pathling job, removes staged files. Returns what could not be done.
    pub(super) async fn cleanup(&self, st: &mut BulkExportRunStatus, mem: &mut Memory) -> Vec<String> {
        let mut left = vec![];
        if !st.phase.is_finished() {
            if let Some(url) = &st.export_status_url
                && !st.export_released
            {
                match self.setup.source.release(url).await {
                    Ok(()) => st.export_released = true,
                    Err(e) => left.push(format!("the export on the source was not released: {e}")),
                }
            }
            if let Some(job) = st.import_job_url.take()
                && let Err(e) = self.setup.pathling.delete_job(&job).await
            {
                left.push(format!("Pathling's import job was not cancelled: {e}"));
            }
        }
        if let Some(s) = &self.setup.staging
            && let Err(e) = s.remove_all(&self.uid).await
        {
            left.push(format!("staged files were not removed: {e}"));
        }
        mem.source_lock = None;
        mem.pathling_lock = None;
        left
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_is_recorded_bounded() {
        let mut st = BulkExportRunStatus::default();
        mark_failed(&mut st, &Failure::new(super::super::Reason::ImportFailed, "x".repeat(10_000)));
        assert_eq!(st.phase, Phase::Failed);
        assert!(st.message.as_ref().unwrap().len() <= MESSAGE_MAX);
        assert!(st.start_time.is_some() && st.duration.is_some());
        assert!(st.conditions.iter().any(|c| c.type_ == "Failed" && c.reason == "ImportFailed"));
    }
}
