//! Custom resource types (kube derive) and condition helpers. No I/O.

pub mod admission;
pub mod bulk;
pub mod common;
pub mod conditions;
pub mod drift;
pub mod run;
pub mod subscription;
pub mod units;
pub mod validate;

pub use bulk::*;
pub use common::*;
pub use drift::*;
pub use run::*;
pub use subscription::*;
pub use units::{parse_duration, parse_quantity};

use kube::CustomResourceExt;

/// Annotation: any new value starts a run now.
pub const ANNOTATION_RUN_NOW: &str = "fhirsync.io/run-now";
/// Annotation: any new value runs a drift verification now.
pub const ANNOTATION_VERIFY_NOW: &str = "fhirsync.io/verify-now";
/// Annotation: any new value makes the next run a full export.
pub const ANNOTATION_RESET_WATERMARK: &str = "fhirsync.io/reset-watermark";
/// On a BulkExportRun: the watermark basis ([`crate::sync::watermark_basis`]) it was created under; its
/// watermark applies only while the sync's basis is the same.
pub const ANNOTATION_WATERMARK_BASIS: &str = "fhirsync.io/watermark-basis";
/// Label on each BulkExportRun naming its BulkExportSync.
pub const LABEL_SYNC: &str = "fhirsync.io/sync";
/// Finalizer on BulkExportRuns (cancel the export and clean staging on delete).
pub const FINALIZER_RUN: &str = "fhirsync.io/run-cleanup";
/// Finalizer on FhirSubscriptionSyncs (remove the Subscriptions from the source on delete).
pub const FINALIZER_SUBSCRIPTIONS: &str = "fhirsync.io/subscription-cleanup";
/// `meta.tag` system marking the Subscriptions fhirsync owns; the code is `<namespace>/<name>/<uid>`.
pub const OWNER_TAG_SYSTEM: &str = "https://fhirsync.io/owner";
/// Field manager for every write the operator makes.
pub const FIELD_MANAGER: &str = "fhirsync";

/// All CRDs as one multi-document YAML stream (what `fhirsync crds` prints and `crds/` holds).
pub fn crds_yaml() -> Result<String, serde_yaml::Error> {
    let mut out = String::new();
    for crd in [BulkExportSync::crd(), BulkExportRun::crd(), FhirSubscriptionSync::crd()] {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&crd)?);
    }
    Ok(out)
}
