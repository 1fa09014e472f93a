//! The BulkExportSync controller's preflight gate: before a first run, the checks of
//! `crate::run::preflight` (Pathling answers, the source speaks Bulk Data, credentials work) run once
//! per spec generation, and a blocking failure holds the first run. Whether to check ([`gate`]) and
//! what the findings mean ([`record`]) are decided apart from running the checks ([`check`]).

use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;

use super::Context;
use crate::api::conditions::{set_condition, types};
use crate::api::{BulkExportSync, BulkExportSyncStatus, RunTemplate};
use crate::run::preflight::Finding;

/// How often failing preflight checks are run again.
pub const PREFLIGHT_RETRY: Duration = Duration::from_secs(60);

/// Whether the preflight checks run now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// They passed for this generation (or are not needed).
    Pass,
    /// They failed for this generation within the last minute: the first run is held this long.
    Wait(Duration),
    /// Run them now.
    Check,
}

/// The checks run when the spec changed since they last passed, at most every minute while they fail.
pub fn gate(sync: &BulkExportSync, st: &BulkExportSyncStatus, now: Timestamp) -> Gate {
    let gen_ = sync.metadata.generation;
    if st.preflight_generation == gen_ {
        return Gate::Pass;
    }
    if let Some(last) = &st.last_preflight {
        let since = now.duration_since(last.0).unsigned_abs();
        // failed for this same generation: wait; a changed spec is checked at once
        let failed = st
            .conditions
            .iter()
            .any(|c| c.type_ == types::PREFLIGHT && c.status == "False" && c.observed_generation == gen_);
        if failed && since < PREFLIGHT_RETRY {
            return Gate::Wait(PREFLIGHT_RETRY - since);
        }
    }
    Gate::Check
}

/// Runs the checks (at most 60 s); `None` when they took longer.
pub async fn check(
    ctx: &Context,
    sync: &BulkExportSync,
    values: &crate::api::validate::SyncValues,
) -> Option<Vec<Finding>> {
    let ns = sync.namespace().unwrap_or_default();
    let t = RunTemplate::from(&sync.spec);
    let checks = crate::run::preflight::preflight(&t, &values.template, &ns, ctx.secrets.as_ref(), &ctx.opts);
    match tokio::time::timeout(Duration::from_secs(60), checks).await {
        Ok(f) => Some(f),
        Err(_) => {
            tracing::warn!(sync = %sync.name_any(), "the preflight checks took longer than 60s");
            None
        }
    }
}

/// Records the findings in the `Preflight` condition; returns the wait before checking again when a
/// blocking check failed or the checks timed out (`None` findings): the first run is held meanwhile.
pub fn record(
    sync: &BulkExportSync,
    st: &mut BulkExportSyncStatus,
    findings: Option<&[Finding]>,
    now: Timestamp,
) -> Option<Duration> {
    let gen_ = sync.metadata.generation;
    let Some(findings) = findings else {
        return Some(PREFLIGHT_RETRY); // the checks timed out: the first run waits for the next try
    };
    st.last_preflight = Some(Time(now));
    let (ok, reason, msg) = crate::run::preflight::summarize(findings);
    set_condition(&mut st.conditions, types::PREFLIGHT, ok, reason, msg, gen_);
    if findings.iter().any(|f| !f.ok && f.blocking) {
        return Some(PREFLIGHT_RETRY);
    }
    st.preflight_generation = gen_;
    None
}
