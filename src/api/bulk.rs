//! BulkExportSync (the schedule and the watermark) and the blocks a run is made of (source, export,
//! target, staging, limits), which a BulkExportRun carries as its template.
#![allow(clippy::duplicated_attributes)] // several printcolumn(...) entries in one #[kube] attribute

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{Auth, FhirServer, Timeouts, Tls};
use super::conditions::conditions_schema;
use super::units::{DURATION_MSG, DURATION_RULE, QUANTITY_MSG, QUANTITY_RULE};

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

/// How a run reads the source.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ExportMethod {
    /// FHIR Bulk Data `$export` (the source exports, fhirsync downloads the files).
    #[default]
    BulkExport,
    /// FHIR search, type by type, in `_lastUpdated` order: for sources without a usable `$export`.
    Search,
    /// `$export` where the source offers it (its CapabilityStatement lists `export`, and the
    /// kick-off is not refused as unknown), else search. The run says which it used.
    Auto,
}

impl ExportMethod {
    fn is_default(m: &ExportMethod) -> bool {
        *m == ExportMethod::BulkExport
    }
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
    #[schemars(length(max = 200), inner(length(min = 1, max = 64), pattern(r"^[A-Z][A-Za-z]{0,63}$")))]
    pub types: Vec<String>,
    /// `_typeFilter` queries such as `Observation?status=final`; several are OR'ed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 200), inner(length(min = 1, max = 2048)))]
    pub type_filters: Vec<String>,
    /// `_elements`: element paths to include.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 200), inner(length(min = 1, max = 256)))]
    pub elements: Vec<String>,
    /// Lower bound (`_since`) of the first run; later incremental runs use the watermark.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<Time>,
    /// Upper bound (`_until`, Bulk Data STU3): only changes before this instant are asked for, to
    /// backfill a window. The watermark never moves past it. A source that ignores `_until` sends
    /// more, which `merge` makes harmless.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<Time>,
    /// `BulkExport` (default), `Search` or `Auto`. A search reads each type with
    /// `_lastUpdated` ranges sorted by `_lastUpdated` (level `System` only; at most one
    /// `typeFilter` per type); `Auto` searches only where the source has no `$export`.
    #[serde(default, skip_serializing_if = "ExportMethod::is_default")]
    pub method: ExportMethod,
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

fn is_auto(g: &PathlingGeneration) -> bool {
    *g == PathlingGeneration::Auto
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

/// Which generation of Pathling server the target runs (how fhirsync talks to it).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum PathlingGeneration {
    /// Found from the server's CapabilityStatement before anything is sent (the default).
    #[default]
    Auto,
    /// Pathling Server 7.x and earlier (`au.csiro.pathling:fhir-server`): `$import` with `source`
    /// parts, no DELETE and no `$export`.
    V7,
    /// Pathling Server 2.x/3.x: `$import` with `input` parts and `saveMode`, DELETE, `$export`.
    V3,
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
    /// Longest wait between two polls of Pathling's `$job`, whatever its `Retry-After` says. 1s–1h.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new(DURATION_RULE).message(DURATION_MSG))]
    #[schemars(length(max = 32))]
    pub max_poll_interval: Option<String>,
    /// Allow link-local and cloud metadata addresses for Pathling (off by default).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_link_local: bool,
    /// `$import` saveMode, sent explicitly: merge (default), overwrite, append, ignore or error.
    #[serde(default)]
    pub save_mode: SaveMode,
    /// The Pathling generation the target speaks: `Auto` (default: read from its CapabilityStatement
    /// before anything is sent), `V7` or `V3` to say so.
    #[serde(default, skip_serializing_if = "is_auto")]
    pub pathling_generation: PathlingGeneration,
    /// Apply the deletions of each run's window on Pathling: from the export manifest's `deleted[]`,
    /// else from the source's history.
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
            max_poll_interval: self.max_poll_interval.clone(),
            max_concurrent_exports: 1,
            max_requests_per_second: None,
            allow_link_local: self.allow_link_local,
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

/// Bounds on what one run may stage, so a peer cannot fill the staging volume.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Limits {
    /// Largest file one download may stage (after gzip decoding); a bigger one fails the run with
    /// `TransferFailed`. A byte quantity such as `16Gi`.
    #[serde(default = "default_max_file")]
    #[x_kube(validation = Rule::new(QUANTITY_RULE).message(QUANTITY_MSG))]
    #[schemars(length(max = 32))]
    pub max_file_size: String,
    /// Most bytes one run may stage in all (files are removed after the import).
    #[serde(default = "default_max_run")]
    #[x_kube(validation = Rule::new(QUANTITY_RULE).message(QUANTITY_MSG))]
    #[schemars(length(max = 32))]
    pub max_run_size: String,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_file_size: default_max_file(), max_run_size: default_max_run() }
    }
}

fn default_max_file() -> String {
    "16Gi".into()
}
fn default_max_run() -> String {
    "1Ti".into()
}

/// CEL rule shared by the sync and the run template: incremental runs need saveMode merge.
pub const MERGE_RULE: &str = "!self.incremental || self.target.saveMode == 'merge'";
/// Message of [`MERGE_RULE`].
pub const MERGE_MSG: &str = "incremental runs allow merge only (set incremental: false for other modes)";
/// CEL rule: what pingAndPull needs.
pub const PNP_RULE: &str = "!has(self.staging.pingAndPull) || (self.export.level == 'System' && !self.target.applyDeletes && !has(self.source.auth))";
/// Message of [`PNP_RULE`].
pub const PNP_MSG: &str = "pingAndPull needs export.level System, target.applyDeletes false and no source.auth (Pathling uses its own credential)";

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
    printcolumn(name = "Reason", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].reason"),
    printcolumn(name = "Schedule", type_ = "string", json_path = ".spec.schedule"),
    printcolumn(name = "Suspend", type_ = "boolean", json_path = ".spec.suspend"),
    printcolumn(name = "Active", type_ = "string", json_path = ".status.activeRun"),
    printcolumn(name = "Last sync", type_ = "date", json_path = ".status.lastSuccessfulRun.finishedAt"),
    printcolumn(name = "Resources", type_ = "integer", json_path = ".status.lastRunResources"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    printcolumn(
        name = "In sync",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"InSync\")].status",
        priority = "1"
    ),
    printcolumn(name = "Verified", type_ = "date", json_path = ".status.drift.verifiedAt", priority = "1"),
    printcolumn(name = "Next run", type_ = "string", json_path = ".status.nextScheduleTime", priority = "1"),
    printcolumn(name = "Watermark", type_ = "string", json_path = ".status.watermark", priority = "1"),
    printcolumn(
        name = "Message",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].message",
        priority = "1"
    )
)]
#[x_kube(validation = Rule::new(MERGE_RULE).message(MERGE_MSG).field_path(".target.saveMode"))]
#[x_kube(validation = Rule::new(PNP_RULE).message(PNP_MSG).field_path(".staging.pingAndPull"))]
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
    /// Bounds on what one run may stage.
    #[serde(default)]
    pub limits: Limits,
    /// Drift verification: compare the ids at the source with the ids in Pathling, on a schedule or
    /// on demand, and repair what differs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify: Option<super::drift::VerifySpec>,
}

pub(crate) fn yes() -> bool {
    true
}
fn default_tz() -> String {
    "Etc/UTC".into()
}
fn default_overlap() -> String {
    "5m".into()
}
pub(crate) fn default_parallel() -> u32 {
    4
}
pub(crate) fn default_run_timeout() -> String {
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
    /// Deletions applied.
    #[serde(default)]
    pub deleted: i64,
    /// Where that run found its deletions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deletion_source: Option<super::run::DeletionSource>,
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
    /// Generation whose preflight checks passed (checked before a first run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preflight_generation: Option<i64>,
    /// When the preflight checks last ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_preflight: Option<Time>,
    /// What the last verification found, and the repair of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drift: Option<super::drift::Drift>,
    /// The value of the `fhirsync.io/verify-now` annotation already acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handled_verify_now: Option<String>,
    /// The last verify.schedule slot a verification was started for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_verify_schedule_time: Option<Time>,
}
