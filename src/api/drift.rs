//! Drift verification: what a BulkExportSync asks for (`spec.verify`), what a verification run is
//! told (`BulkExportRun.spec.verify`), and what it found (`status.drift` on both).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::bulk::yes;

/// Most example ids kept per type and kind of drift.
pub const EXAMPLES: usize = 5;

/// `spec.verify` of a BulkExportSync: compare, per synced type, the ids at the source with the ids in
/// Pathling, and repair what differs.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct VerifySpec {
    /// When to verify: a 5-field cron expression (or @daily, …) in the sync's timeZone. Absent: only
    /// on demand (annotation `fhirsync.io/verify-now: <any new value>`, or `fhirsync sync-once --verify`).
    /// A verification never runs at the same time as a run of the same sync: a due one waits for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^\\\\s*(@(yearly|annually|monthly|weekly|daily|midnight|hourly)|\\\\S+(\\\\s+\\\\S+){4})\\\\s*$')").message("verify.schedule must be a 5-field cron expression such as \"30 2 * * *\" or @daily"))]
    #[schemars(length(max = 256))]
    pub schedule: Option<String>,
    /// Repair drift (default true): resources Pathling holds that the source no longer has are deleted
    /// from Pathling (each confirmed gone at the source first); types in which Pathling misses
    /// resources are exported again in full by a repair run, then verified again.
    #[serde(default = "yes")]
    pub repair: bool,
}

impl Default for VerifySpec {
    fn default() -> Self {
        Self { schedule: None, repair: true }
    }
}

/// `spec.verify` of a verification run (trigger `Verify`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VerifyRun {
    /// Delete the extra resources found (each confirmed gone at the source first).
    #[serde(default)]
    pub repair: bool,
    /// Resources changed at the source after this instant are pending (the next run brings them), not
    /// drift. Usually the sync's watermark.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_after: Option<Time>,
    /// Other BulkExportSyncs that write the same types into the same Pathling: extra resources may be
    /// theirs, so none are deleted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 100), inner(length(max = 253)))]
    pub shared_with: Vec<String>,
    /// This verification checks a repair (it does not start another repair).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub recheck: bool,
}

/// How a verification read the source's ids.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum IdRead {
    /// A bulk export with `_elements=id`.
    Elements,
    /// A full bulk export (the source refused `_elements`).
    FullExport,
}

/// The drift of one resource type.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TypeDrift {
    /// Resource type.
    #[serde(rename = "type")]
    pub type_: String,
    /// Resources at the source (as the sync's export selects them).
    pub source: i64,
    /// Resources in Pathling.
    pub pathling: i64,
    /// At the source, not in Pathling.
    pub missing: i64,
    /// In Pathling, not at the source.
    pub extra: i64,
    /// At the source, not in Pathling, but changed after the last run's watermark: the next run
    /// brings them (not drift).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub pending: i64,
    /// A few missing ids.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 5), inner(length(max = 64)))]
    pub missing_examples: Vec<String>,
    /// A few extra ids.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 5), inner(length(max = 64)))]
    pub extra_examples: Vec<String>,
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

/// Where a repair is.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum RepairState {
    /// A repair run will export the types again.
    Pending,
    /// The repair run is in flight.
    Running,
    /// The repair run finished; a verification checks it.
    Verifying,
    /// Verified: the drift is gone.
    Done,
    /// The repair did not close the drift (see message); the next verification tries again.
    Failed,
}

/// A repair of drift.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RepairStatus {
    pub state: RepairState,
    /// Types exported again in full.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256), inner(length(max = 64)))]
    pub types: Vec<String>,
    /// The repair run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<String>,
    /// What happened.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// What a verification found (a run's `status.drift`; a sync's `status.drift` adds the repair).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Drift {
    /// When the comparison finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified_at: Option<Time>,
    /// The verification run (in a sync's status).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<String>,
    /// Pathling held exactly what the source held (pending changes aside), or does after the extras
    /// were deleted.
    pub in_sync: bool,
    /// Per resource type, in name order.
    #[serde(default)]
    #[schemars(length(max = 256))]
    pub types: Vec<TypeDrift>,
    /// How the source's ids were read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_read: Option<IdRead>,
    /// Extra resources deleted from Pathling (each confirmed gone at the source first).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub deleted: i64,
    /// Extra resources left in Pathling: present at the source outside the export's selection, or the
    /// source could not say.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub kept: i64,
    /// Why extra resources were not deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_repaired: Option<String>,
    /// Lines of the id files that were not a resource with a valid type and id.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub unreadable: i64,
    /// The repair of this drift (in a sync's status).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repair: Option<RepairStatus>,
}

impl Drift {
    /// Totals: (missing, extra, pending).
    pub fn totals(&self) -> (i64, i64, i64) {
        self.types.iter().fold((0, 0, 0), |(m, e, p), t| (m + t.missing, e + t.extra, p + t.pending))
    }

    /// Types in which Pathling misses resources.
    pub fn missing_types(&self) -> Vec<String> {
        self.types.iter().filter(|t| t.missing > 0).map(|t| t.type_.clone()).collect()
    }

    /// One line: what differs, or that nothing does.
    pub fn summary(&self) -> String {
        let list = |f: &dyn Fn(&TypeDrift) -> i64| {
            self.types
                .iter()
                .filter(|t| f(t) > 0)
                .map(|t| format!("{} {}", f(t), t.type_))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let (missing, extra, pending) = self.totals();
        let mut parts = vec![];
        if missing > 0 {
            let ex = self.types.iter().find(|t| !t.missing_examples.is_empty());
            let e = ex.map(|t| format!(" (e.g. {}/{})", t.type_, t.missing_examples[0])).unwrap_or_default();
            parts.push(format!("misses {}{e}", list(&|t| t.missing)));
        }
        if extra > 0 {
            let ex = self.types.iter().find(|t| !t.extra_examples.is_empty());
            let e = ex.map(|t| format!(" (e.g. {}/{})", t.type_, t.extra_examples[0])).unwrap_or_default();
            parts.push(format!("holds {} that the source does not{e}", list(&|t| t.extra)));
        }
        if parts.is_empty() {
            let held: i64 = self.types.iter().map(|t| t.pathling).sum();
            let mut s = format!("Pathling matches the source: {held} resources in {} types", self.types.len());
            if pending > 0 {
                s.push_str(&format!(" ({pending} changed since the last run, pending)"));
            }
            return s;
        }
        let mut s = format!("Pathling {}", parts.join(" and "));
        if pending > 0 {
            s.push_str(&format!("; {pending} more changed since the last run (pending)"));
        }
        s
    }
}
