//! BulkExportRun: one export/import job. Like a Job carries its pod template, a run carries a
//! snapshot of what it runs (`spec.template`), so it runs and cleans up without its BulkExportSync,
//! and an edit of the sync never changes a run in flight.
#![allow(clippy::duplicated_attributes)] // several printcolumn(...) entries in one #[kube] attribute

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::bulk::{
    BulkExportSyncSpec, ExportSpec, Limits, PNP_MSG, PNP_RULE, PathlingTarget, Staging, default_parallel,
    default_run_timeout,
};
use super::common::FhirServer;
use super::conditions::conditions_schema;
use super::units::{DURATION_MSG, DURATION_RULE};

/// What a run runs: the parts of its BulkExportSync's spec a run needs, copied when the run is created.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(PNP_RULE).message(PNP_MSG).field_path(".staging.pingAndPull"))]
pub struct RunTemplate {
    /// The FHIR server to export from.
    pub source: FhirServer,
    /// What to export.
    #[serde(default)]
    pub export: ExportSpec,
    /// The Pathling server to import into.
    pub target: PathlingTarget,
    /// Where exported files are staged for Pathling.
    pub staging: Staging,
    /// Files downloaded at once.
    #[serde(default = "default_parallel")]
    #[schemars(range(min = 1, max = 64))]
    pub max_parallel_downloads: u32,
    /// Longest the run may take before it is failed.
    #[serde(default = "default_run_timeout")]
    #[x_kube(validation = Rule::new(DURATION_RULE).message(DURATION_MSG))]
    #[schemars(length(max = 32))]
    pub run_timeout: String,
    /// Bounds on what the run may stage.
    #[serde(default)]
    pub limits: Limits,
}

impl From<&BulkExportSyncSpec> for RunTemplate {
    fn from(s: &BulkExportSyncSpec) -> Self {
        Self {
            source: s.source.clone(),
            export: s.export.clone(),
            target: s.target.clone(),
            staging: s.staging.clone(),
            max_parallel_downloads: s.max_parallel_downloads,
            run_timeout: s.run_timeout.clone(),
            limits: s.limits.clone(),
        }
    }
}

/// Why a run was started.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum Trigger {
    /// By the schedule (or a spec change when there is none).
    Schedule,
    /// By the `fhirsync.io/run-now` annotation.
    RunNow,
    /// Created by hand.
    #[default]
    Manual,
    /// A drift verification (`spec.verify.schedule`, the `fhirsync.io/verify-now` annotation, or a
    /// check after a repair): compares ids, imports nothing.
    Verify,
    /// A repair: a full export of the types a verification found Pathling missing resources in; it
    /// never moves the watermark.
    Repair,
}

/// Reference to the BulkExportSync a run belongs to.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct SyncRef {
    /// Name of a BulkExportSync in the same namespace.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// One export/import job of a BulkExportSync.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "fhirsync.io",
    version = "v1alpha1",
    kind = "BulkExportRun",
    plural = "bulkexportruns",
    shortname = "ber",
    category = "fhirsync",
    namespaced,
    status = "BulkExportRunStatus",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Reason", type_ = "string", json_path = ".status.reason"),
    printcolumn(name = "Resources", type_ = "integer", json_path = ".status.resourceCount"),
    printcolumn(name = "Started", type_ = "date", json_path = ".status.startTime"),
    printcolumn(name = "Duration", type_ = "string", json_path = ".status.duration"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    printcolumn(name = "Trigger", type_ = "string", json_path = ".spec.trigger", priority = "1"),
    printcolumn(name = "Sync", type_ = "string", json_path = ".spec.syncRef.name", priority = "1"),
    printcolumn(name = "Progress", type_ = "string", json_path = ".status.progress", priority = "1"),
    printcolumn(name = "Message", type_ = "string", json_path = ".status.message", priority = "1")
)]
#[x_kube(validation = Rule::new(RUN_SPEC_IMMUTABLE).message("BulkExportRun spec is immutable (fhirsync only fills in spec.template, once); create a new run instead"))]
#[serde(rename_all = "camelCase")]
pub struct BulkExportRunSpec {
    /// The BulkExportSync whose source, target and staging this run uses.
    pub sync_ref: SyncRef,
    /// `_since` of this run; absent means a full export.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<Time>,
    /// Schedule, RunNow or Manual.
    #[serde(default)]
    pub trigger: Trigger,
    /// What the run runs, copied from the sync when the run is created (for a run created by hand,
    /// when it starts). Edits of the sync never reach a run in flight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<RunTemplate>,
    /// For trigger Verify: how the verification runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify: Option<super::drift::VerifyRun>,
}

/// The spec never changes, except that a missing template may be filled in once.
pub const RUN_SPEC_IMMUTABLE: &str = "self == oldSelf || (!has(oldSelf.template) && has(self.template) && self.syncRef == oldSelf.syncRef && self.trigger == oldSelf.trigger && has(self.since) == has(oldSelf.since) && (!has(self.since) || self.since == oldSelf.since) && has(self.verify) == has(oldSelf.verify) && (!has(self.verify) || self.verify == oldSelf.verify))";

/// Phase of a run.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum Phase {
    /// Not started (or waiting for the source or Pathling to be free).
    #[default]
    Pending,
    /// `$export` kicked off; polling its status.
    Exporting,
    /// Downloading output files into staging.
    Transferring,
    /// Pathling `$import` running.
    Importing,
    /// Applying the window's deletions (from the manifest's `deleted[]` or the source's history).
    Deleting,
    /// A verification compares the ids at the source with the ids in Pathling.
    Verifying,
    /// A verification deletes from Pathling what the source no longer has.
    Repairing,
    /// Finished successfully (possibly with export errors, see exportErrors).
    Succeeded,
    /// Finished with an error; see message.
    Failed,
}

impl Phase {
    /// Whether the run has ended.
    pub fn is_finished(self) -> bool {
        matches!(self, Phase::Succeeded | Phase::Failed)
    }
}

/// Where a run found the deletions of its window, best first.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum DeletionSource {
    /// The export manifest's `deleted[]` (the SMART reference server fills it).
    Manifest,
    /// The source's history (`_history?_since=`), for sources whose manifests list none (Helios,
    /// HAPI, Medplum).
    History,
    /// The source offers neither: resources deleted there stay in Pathling until a verification with
    /// repair removes them.
    Unavailable,
    /// A full export: there is no window (resources deleted before it are found by a verification).
    FullExport,
    /// `target.applyDeletes` is false.
    Disabled,
}

impl DeletionSource {
    /// The name used in status and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            DeletionSource::Manifest => "Manifest",
            DeletionSource::History => "History",
            DeletionSource::Unavailable => "Unavailable",
            DeletionSource::FullExport => "FullExport",
            DeletionSource::Disabled => "Disabled",
        }
    }
}

/// File counts of a run.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct FileCounts {
    /// Output files in the manifest.
    pub total: i64,
    /// Files completely staged.
    pub staged: i64,
}

/// Observed state of a BulkExportRun; persisted after every step so a restarted operator resumes.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BulkExportRunStatus {
    /// Where the run is.
    #[serde(default)]
    pub phase: Phase,
    /// Complete, Failed, Degraded, InsecureTLS.
    #[serde(default)]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
    /// When the run started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When the run ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// Run length, for the printer column (e.g. `3m12s`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<String>,
    /// Operator clock when `$export` was sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kickoff_time: Option<Time>,
    /// The export's status URL (re-polled after a restart).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub export_status_url: Option<String>,
    /// Last `X-Progress` (export) or import progress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<String>,
    /// The manifest's transactionTime.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transaction_time: Option<Time>,
    /// Output files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files: Option<FileCounts>,
    /// Bytes staged.
    #[serde(default)]
    pub bytes: i64,
    /// Resources staged and imported, by type.
    #[serde(default)]
    pub resources: BTreeMap<String, i64>,
    /// Sum of `resources` (printer column).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_count: Option<i64>,
    /// Lines in the manifest's error[] files.
    #[serde(default)]
    pub export_errors: i64,
    /// Deletions applied on Pathling.
    #[serde(default)]
    pub deleted: i64,
    /// Where the run found the deletions of its window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deletion_source: Option<DeletionSource>,
    /// Some deletions of the window could not be read from the source: the watermark stays, so the
    /// next run looks for them again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deletions_incomplete: bool,
    /// What a verification (trigger Verify) found.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drift: Option<super::drift::Drift>,
    /// Pathling's `$job` URL of the import.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub import_job_url: Option<String>,
    /// Polls of the current asynchronous job so far (they start early and back off).
    #[serde(default)]
    pub poll_attempts: u32,
    /// A run that reads the source by search (`export.method: Search`, or `Auto` on a source without
    /// `$export`): where it is, so a restarted process goes on from the last finished file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crawl: Option<CrawlStatus>,
    /// The export was released on the source (`DELETE` of its status URL) after its files were staged.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub export_released: bool,
    /// Kick-offs whose answer was lost (the process died while sending): each may have started an
    /// export on the source that fhirsync cannot find or release (Bulk Data offers no way to).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub lost_kickoffs: u32,
    /// While the run waits for its source or its Pathling: runs ahead of it in the queue, shown in
    /// steps (0, 1, then fewer than 10, 100, 1000, …) so a long queue does not rewrite every status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_position: Option<u32>,
    /// What is happening, or what went wrong and how to fix it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Machine-readable reason of the failure or degradation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Where a search crawl is. Each type is read in `_lastUpdated` order; a file is finished only
/// between two instants, so every resource of `type` updated up to `after` is in a finished file.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CrawlStatus {
    /// The upper bound of what the crawl reads (`_lastUpdated=le`): its start, or `export.until`.
    pub up_to: Time,
    /// Types completely read (an index into the run's types).
    #[serde(default)]
    pub types_done: u32,
    /// The type being read, and the instant up to which its resources are in finished files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<Time>,
    /// Search pages read so far by the run.
    #[serde(default)]
    pub pages: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}
