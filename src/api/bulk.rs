//! BulkExportSync (the schedule and the watermark) and BulkExportRun (one export/import job).
#![allow(clippy::duplicated_attributes)] // several printcolumn(...) entries in one #[kube] attribute

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{Auth, DURATION_MSG, DURATION_RULE, FhirServer, Timeouts, Tls};
use super::conditions::conditions_schema;

/// Export level: which `$export` endpoint is used.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ExportLevel {
    /// `{base}/$export`: every resource on the server.
    #[default]
    System,
    /// `{base}/Patient/$export`: every patient compartment.
    Patient,
    /// `{base}/Group/{groupId}/$export`: the members of one Group.
    Group,
}

/// What to export.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.level == 'Group' ? has(self.groupId) : !has(self.groupId)").message("export.groupId is required when level is Group, and only then"))]
pub struct ExportSpec {
    /// `System` (default), `Patient` or `Group`.
    #[serde(default)]
    pub level: ExportLevel,
    /// Group id, required iff level is `Group`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub group_id: Option<String>,
    /// Resource types to export (`_type`); empty means all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 200))]
    pub types: Vec<String>,
    /// `_typeFilter` queries such as `Observation?status=final`; several are OR'ed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 200))]
    pub type_filters: Vec<String>,
    /// `_elements`: element paths to include.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 200))]
    pub elements: Vec<String>,
    /// Lower bound (`_since`) of the first run; later incremental runs use the watermark.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<Time>,
}

/// Pathling's `$import` save mode.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum SaveMode {
    /// Upsert on resource id (the only mode allowed with incremental runs).
    #[default]
    Merge,
    /// Replace the whole table of each imported type.
    Overwrite,
    /// Append rows without matching ids.
    Append,
    /// Skip types whose table already exists.
    Ignore,
    /// Fail when a type's table already exists.
    Error,
}

impl SaveMode {
    /// The code Pathling expects.
    pub fn code(self) -> &'static str {
        match self {
            SaveMode::Merge => "merge",
            SaveMode::Overwrite => "overwrite",
            SaveMode::Append => "append",
            SaveMode::Ignore => "ignore",
            SaveMode::Error => "error",
        }
    }
}

/// The Pathling server that receives the data.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct PathlingTarget {
    /// Pathling's FHIR base URL, e.g. `http://pathling-fhir.analytics:8080/fhir`.
    #[x_kube(validation = Rule::new("self.matches('^https?://[^/?#]+')").message("url must be an absolute http(s) URL"))]
    #[schemars(length(min = 1, max = 2048))]
    pub url: String,
    /// Credentials toward Pathling; absent means anonymous.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<Auth>,
    /// TLS settings toward Pathling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<Tls>,
    /// Network timeouts toward Pathling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<Timeouts>,
    /// `$import` saveMode, sent explicitly: merge (default), overwrite, append, ignore or error.
    #[serde(default)]
    pub save_mode: SaveMode,
    /// Replay the export's `deleted[]` entries as DELETEs on Pathling.
    #[serde(default = "yes")]
    pub apply_deletes: bool,
}

impl PathlingTarget {
    /// The connection part, in the shape shared with sources.
    pub fn server(&self) -> FhirServer {
        FhirServer {
            url: self.url.clone(),
            auth: self.auth.clone(),
            tls: self.tls.clone(),
            timeouts: self.timeouts.clone(),
        }
    }
}

/// Staging on a filesystem shared with Pathling.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct VolumeStaging {
    /// Directory as the operator sees it. Files go to `path/<namespace>/<run>/`. In the operator it must
    /// lie under `--staging-root`.
    #[x_kube(validation = Rule::new("self.startsWith('/')").message("staging.volume.path must be an absolute path"))]
    #[schemars(length(min = 1, max = 1024))]
    pub path: String,
    /// The same directory as Pathling sees it, as a URL under `pathling.import.allowableSources`,
    /// e.g. `file:///usr/share/staging`.
    #[x_kube(validation = Rule::new("self.matches('^(file|s3a|s3|hdfs)://')").message("staging.volume.pathlingPath must be a file://, s3a:// or hdfs:// URL that Pathling can read"))]
    #[schemars(length(min = 1, max = 1024))]
    pub pathling_path: String,
}

/// Staging in an S3-compatible object store.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ObjectStoreStaging {
    /// Where fhirsync writes: `s3://bucket/prefix`.
    #[x_kube(validation = Rule::new("self.matches('^s3://[^/]+')").message("staging.objectStore.url must look like s3://bucket/prefix"))]
    #[schemars(length(min = 1, max = 1024))]
    pub url: String,
    /// The same location as Pathling reads it: `s3a://bucket/prefix`.
    #[x_kube(validation = Rule::new("self.matches('^(s3a|s3)://[^/]+')").message("staging.objectStore.pathlingUrl must look like s3a://bucket/prefix"))]
    #[schemars(length(min = 1, max = 1024))]
    pub pathling_url: String,
    /// S3 endpoint for non-AWS stores (MinIO, Ceph), e.g. `http://minio.storage:9000`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Region.
    #[serde(default = "default_region")]
    pub region: String,
    /// Secret key holding the access key id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_key_id_ref: Option<super::common::SecretKeyRef>,
    /// Secret key holding the secret access key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_access_key_ref: Option<super::common::SecretKeyRef>,
}

fn default_region() -> String {
    "us-east-1".into()
}

/// Pathling pulls the export itself (`$import-pnp`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct PingAndPull {}

/// Where exported files are put for Pathling to read. Exactly one of the three.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("[has(self.volume), has(self.objectStore), has(self.pingAndPull)].filter(x, x).size() == 1").message("staging: set exactly one of volume, objectStore, pingAndPull"))]
pub struct Staging {
    /// A directory shared with Pathling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<VolumeStaging>,
    /// An S3-compatible bucket Pathling reads with `s3a://`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object_store: Option<ObjectStoreStaging>,
    /// No staging: Pathling runs the export itself with `$import-pnp`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ping_and_pull: Option<PingAndPull>,
}

/// A scheduled, incremental bulk export from a FHIR server into Pathling.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "fhirsync.io",
    version = "v1alpha1",
    kind = "BulkExportSync",
    plural = "bulkexportsyncs",
    shortname = "bes",
    category = "fhirsync",
    namespaced,
    status = "BulkExportSyncStatus",
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Last sync", type_ = "date", json_path = ".status.lastSuccessfulRun.finishedAt"),
    printcolumn(name = "Resources", type_ = "integer", json_path = ".status.lastRunResources"),
    printcolumn(name = "Next run", type_ = "date", json_path = ".status.nextScheduleTime"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new("!self.spec.incremental || self.spec.target.saveMode == 'merge'").message("spec.target.saveMode: incremental runs allow merge only (set incremental: false for other modes)").field_path(".spec.target.saveMode"),
    validation = Rule::new("!has(self.spec.staging.pingAndPull) || (self.spec.export.level == 'System' && !self.spec.target.applyDeletes && !has(self.spec.source.auth))").message("spec.staging.pingAndPull needs export.level System, target.applyDeletes false and no source.auth (Pathling uses its own credential)").field_path(".spec.staging.pingAndPull")
)]
#[serde(rename_all = "camelCase")]
pub struct BulkExportSyncSpec {
    /// The FHIR server to export from.
    pub source: FhirServer,
    /// What to export.
    #[serde(default)]
    pub export: ExportSpec,
    /// Standard 5-field cron expression (or @hourly, @daily, ...). Absent: one run per spec generation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^\\\\s*(@(yearly|annually|monthly|weekly|daily|midnight|hourly)|\\\\S+(\\\\s+\\\\S+){4})\\\\s*$')").message("schedule must be a 5-field cron expression such as \"0 */6 * * *\" or @hourly/@daily"))]
    #[schemars(length(max = 256))]
    pub schedule: Option<String>,
    /// IANA time zone of the schedule.
    #[serde(default = "default_tz")]
    #[schemars(length(min = 1, max = 64))]
    pub time_zone: String,
    /// No new runs while true; a run in flight finishes.
    #[serde(default)]
    pub suspend: bool,
    /// Export only changes since the watermark (`_since`) after the first run.
    #[serde(default = "yes")]
    pub incremental: bool,
    /// Safety margin subtracted from the watermark.
    #[serde(default = "default_overlap")]
    #[x_kube(validation = Rule::new(DURATION_RULE).message(DURATION_MSG))]
    #[schemars(length(max = 32))]
    pub since_overlap: String,
    /// The Pathling server to import into.
    pub target: PathlingTarget,
    /// Where exported files are staged for Pathling.
    pub staging: Staging,
    /// Files downloaded at once.
    #[serde(default = "default_parallel")]
    #[schemars(range(min = 1, max = 64))]
    pub max_parallel_downloads: u32,
    /// Longest a run may take before it is failed.
    #[serde(default = "default_run_timeout")]
    #[x_kube(validation = Rule::new(DURATION_RULE).message(DURATION_MSG))]
    #[schemars(length(max = 32))]
    pub run_timeout: String,
    /// Finished BulkExportRuns kept.
    #[serde(default = "default_history")]
    #[schemars(range(min = 0, max = 1000))]
    pub history_limit: u32,
}

fn yes() -> bool {
    true
}
fn default_tz() -> String {
    "Etc/UTC".into()
}
fn default_overlap() -> String {
    "5m".into()
}
fn default_parallel() -> u32 {
    4
}
fn default_run_timeout() -> String {
    "24h".into()
}
fn default_history() -> u32 {
    10
}

/// Summary of the last successful run.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RunSummary {
    /// BulkExportRun name.
    pub name: String,
    /// When it finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Time>,
    /// The export manifest's transactionTime.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transaction_time: Option<Time>,
    /// Resources imported, by type.
    #[serde(default)]
    pub resources: BTreeMap<String, i64>,
    /// Deletions replayed.
    #[serde(default)]
    pub deleted: i64,
}

/// Observed state of a BulkExportSync.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BulkExportSyncStatus {
    /// The generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready, Progressing, Degraded, InsecureTLS.
    #[serde(default)]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
    /// The `_since` of the next incremental run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watermark: Option<Time>,
    /// When the last run was started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_schedule_time: Option<Time>,
    /// When the next scheduled run starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_schedule_time: Option<Time>,
    /// Name of the BulkExportRun in flight, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_run: Option<String>,
    /// The last successful run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_successful_run: Option<RunSummary>,
    /// Resources imported by the last successful run (printer column).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_run_resources: Option<i64>,
    /// The value of the `fhirsync.io/run-now` annotation already acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handled_run_now: Option<String>,
    /// The value of the `fhirsync.io/reset-watermark` annotation already acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handled_reset_watermark: Option<String>,
    /// Fingerprint of source.url, export and target.url the watermark belongs to; a change resets it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watermark_scope: Option<String>,
    /// Generation that the last run was started for (runs without a schedule: one per generation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_run_generation: Option<i64>,
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
    printcolumn(name = "Progress", type_ = "string", json_path = ".status.progress"),
    printcolumn(name = "Resources", type_ = "integer", json_path = ".status.resourceCount"),
    printcolumn(name = "Started", type_ = "date", json_path = ".status.startTime"),
    printcolumn(name = "Duration", type_ = "string", json_path = ".status.duration")
)]
#[x_kube(validation = Rule::new("self == oldSelf").message("BulkExportRun spec is immutable; create a new run instead"))]
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
}

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
    /// Replaying `deleted[]` as DELETEs.
    Deleting,
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
    /// Deletions replayed on Pathling.
    #[serde(default)]
    pub deleted: i64,
    /// Pathling's `$job` URL of the import.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub import_job_url: Option<String>,
    /// Consecutive status polls that came without Retry-After (drives exponential backoff).
    #[serde(default)]
    pub poll_attempts: u32,
    /// What is happening, or what went wrong and how to fix it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Machine-readable reason of the failure or degradation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}
