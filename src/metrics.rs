//! Prometheus metrics (names are stable and documented in the README).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    pub kind: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TypeLabels {
    pub resource_type: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SyncLabels {
    pub namespace: String,
    pub name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SubscriptionLabels {
    pub namespace: String,
    pub name: String,
    pub state: String,
}

/// All metrics of the operator.
pub struct Metrics {
    pub registry: Registry,
    pub reconciles: Family<KindLabels, Counter>,
    pub reconcile_failures: Family<FailureLabels, Counter>,
    pub runs: Family<ResultLabels, Counter>,
    pub run_duration: Histogram,
    pub resources_imported: Family<TypeLabels, Counter>,
    pub bytes_transferred: Counter,
    pub watermark_age: Family<SyncLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pub subscriptions: Family<SubscriptionLabels, Gauge>,
    pub status_conflicts: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("fhirsync");
        let reconciles = Family::<KindLabels, Counter>::default();
        registry.register("reconciles", "Reconciliations by kind", reconciles.clone());
        let reconcile_failures = Family::<FailureLabels, Counter>::default();
        registry.register(
            "reconcile_failures",
            "Failed reconciliations by kind and reason",
            reconcile_failures.clone(),
        );
        let runs = Family::<ResultLabels, Counter>::default();
        registry.register("runs", "Finished BulkExportRuns by result (succeeded, failed)", runs.clone());
        let run_duration = Histogram::new(exponential_buckets(1.0, 2.0, 20));
        registry.register("run_duration_seconds", "Duration of finished BulkExportRuns", run_duration.clone());
        let resources_imported = Family::<TypeLabels, Counter>::default();
        registry.register("resources_imported", "Resources imported into Pathling by type", resources_imported.clone());
        let bytes_transferred = Counter::default();
        registry.register("bytes_transferred", "Bytes staged from sources", bytes_transferred.clone());
        let watermark_age = Family::<SyncLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        registry.register("watermark_age_seconds", "Age of each BulkExportSync's watermark", watermark_age.clone());
        let subscriptions = Family::<SubscriptionLabels, Gauge>::default();
        registry.register(
            "subscriptions",
            "Subscriptions on sources by state (active, requested, failing)",
            subscriptions.clone(),
        );
        let status_conflicts = Counter::default();
        registry.register(
            "status_conflicts",
            "Status writes refused because the object changed since it was read (decided again)",
            status_conflicts.clone(),
        );
        Self {
            registry,
            status_conflicts,
            reconciles,
            reconcile_failures,
            runs,
            run_duration,
            resources_imported,
            bytes_transferred,
            watermark_age,
            subscriptions,
        }
    }
}

impl Metrics {
    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut s = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut s, &self.registry);
        s
    }
}
