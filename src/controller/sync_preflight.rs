//! The BulkExportSync controller's preflight gate: before a first run, the checks of
//! `crate::run::preflight` (Pathling answers, the source speaks Bulk Data, credentials work) run once
//! per spec generation, and a blocking failure holds the first run.

use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;

use super::Context;
use crate::api::conditions::{set_condition, types};
use crate::api::{BulkExportSync, BulkExportSyncStatus, RunTemplate};

/// How often failing preflight checks are run again.
const PREFLIGHT_RETRY: Duration = Duration::from_secs(60);

/// Runs the preflight checks when the spec changed since they last passed (at most every minute while
/// they fail) and sets the `Preflight` condition. Returns the wait before checking again when a
/// blocking check fails (the first run is held meanwhile).
pub(super) async fn preflight(
    ctx: &Context,
    sync: &BulkExportSync,
    st: &mut BulkExportSyncStatus,
    values: &crate::api::validate::SyncValues,
    now: Timestamp,
) -> Option<Duration> {
    let gen_ = sync.metadata.generation;
    if st.preflight_generation == gen_ {
        return None;
    }
    if let Some(last) = &st.last_preflight {
        let since = now.duration_since(last.0).unsigned_abs();
        // failed for this same generation: wait; a changed spec is checked at once
        let failed = st
            .conditions
            .iter()
            .any(|c| c.type_ == types::PREFLIGHT && c.status == "False" && c.observed_generation == gen_);
        if failed && since < PREFLIGHT_RETRY {
            return Some(PREFLIGHT_RETRY - since);
        }
    }
    let ns = sync.namespace().unwrap_or_default();
    let t = RunTemplate::from(&sync.spec);
    let findings = match tokio::time::timeout(
        Duration::from_secs(60),
        crate::run::preflight::preflight(&t, &values.template, &ns, ctx.secrets.as_ref(), &ctx.opts),
    )
    .await
    {
        Ok(f) => f,
        Err(_) => {
            tracing::warn!(sync = %sync.name_any(), "the preflight checks took longer than 60s");
            return Some(PREFLIGHT_RETRY);
        }
    };
    st.last_preflight = Some(Time(now));
    let (ok, reason, msg) = crate::run::preflight::summarize(&findings);
    set_condition(&mut st.conditions, types::PREFLIGHT, ok, reason, msg, gen_);
    if findings.iter().any(|f| !f.ok && f.blocking) {
        return Some(PREFLIGHT_RETRY);
    }
    st.preflight_generation = gen_;
    None
}
