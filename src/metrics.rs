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
pub struct DriftLabels {
    pub namespace: String,
    pub name: String,
    pub resource_type: String,
    /// `missing` (in Pathling) or `extra` (in Pathling).
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RelayLabels {
    pub namespace: String,
    pub name: String,
    /// `received`, `applied`, `failed`.
    pub result: String,
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
    /// Every sample name the operator exposes (`fhirsync_runs_total`, `…_bucket`, …).
    pub samples: Vec<String>,
    pub reconciles: Family<KindLabels, Counter>,
    pub reconcile_failures: Family<FailureLabels, Counter>,
    pub runs: Family<ResultLabels, Counter>,
    pub run_duration: Histogram,
    pub resources_imported: Family<TypeLabels, Counter>,
    pub bytes_transferred: Counter,
    pub watermark_age: Family<SyncLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pub last_success: Family<SyncLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pub subscriptions: Family<SubscriptionLabels, Gauge>,
    pub status_conflicts: Counter,
    pub run_tasks: Counter,
    /// Where the runs' time goes.
    pub run_clock: crate::run::Clock,
    pub drift: Family<DriftLabels, Gauge>,
    pub in_sync: Family<SyncLabels, Gauge>,
    pub last_verification: Family<SyncLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pub relay_changes: Family<RelayLabels, Counter>,
    pub relay_writes: Family<SyncLabels, Counter>,
    pub relay_catch_ups: Family<SyncLabels, Counter>,
    pub relay_lag: Histogram,
    pub relay_pending_bytes: Gauge,
}

/// Registers metrics and remembers the sample names each exposes (for the dashboard's test and docs).
struct Registrar {
    registry: Registry,
    samples: Vec<String>,
}

impl Registrar {
    fn add<M: prometheus_client::registry::Metric + Clone>(
        &mut self,
        name: &str,
        help: &str,
        m: M,
        suffixes: &[&str],
    ) -> M {
        self.registry.register(name, help, m.clone());
        self.samples.extend(suffixes.iter().map(|s| format!("fhirsync_{name}{s}")));
        m
    }
    fn counter<M: prometheus_client::registry::Metric + Clone>(&mut self, name: &str, help: &str, m: M) -> M {
        self.add(name, help, m, &["_total"])
    }
    fn gauge<M: prometheus_client::registry::Metric + Clone>(&mut self, name: &str, help: &str, m: M) -> M {
        self.add(name, help, m, &[""])
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut r = Registrar { registry: Registry::with_prefix("fhirsync"), samples: vec![] };
        let reconciles = r.counter("reconciles", "Reconciliations by kind", Family::default());
        let reconcile_failures =
            r.counter("reconcile_failures", "Failed reconciliations by kind and reason", Family::default());
        let runs = r.counter("runs", "Finished BulkExportRuns by result (succeeded, failed)", Family::default());
        let run_duration = r.add(
            "run_duration_seconds",
            "Duration of finished BulkExportRuns",
            Histogram::new(exponential_buckets(1.0, 2.0, 20)),
            &["_bucket", "_sum", "_count"],
        );
        let resources_imported =
            r.counter("resources_imported", "Resources imported into Pathling by type", Family::default());
        let bytes_transferred = r.counter("bytes_transferred", "Bytes staged from sources", Counter::default());
        let watermark_age =
            r.gauge("watermark_age_seconds", "Age of each BulkExportSync's watermark", Family::default());
        let last_success = r.gauge(
            "last_success_timestamp_seconds",
            "When each BulkExportSync's last successful run finished (Unix time)",
            Family::default(),
        );
        let subscriptions = r.gauge(
            "subscriptions",
            "Subscriptions on sources by state (active, requested, failing)",
            Family::default(),
        );
        let status_conflicts = r.counter(
            "status_conflicts",
            "Status writes refused because the object changed since it was read (decided again)",
            Counter::default(),
        );
        let run_clock = crate::run::Clock {
            waiting: r.counter(
                "run_waiting_seconds",
                "Seconds the runs spent in their own waits: between polls of a job, before a retry",
                Default::default(),
            ),
            working: r.counter(
                "run_working_seconds",
                "Seconds the runs spent in steps: requests, transfers, waiting in a queue for a source or a Pathling",
                Default::default(),
            ),
        };
        let run_tasks = r.counter(
            "run_tasks_started",
            "Run tasks started (once per run per process; a run found finished is never started)",
            Counter::default(),
        );
        let drift = r.gauge(
            "drift_resources",
            "Resources the last verification found missing in Pathling or extra in it, per sync and type",
            Family::default(),
        );
        let in_sync = r.gauge(
            "in_sync",
            "1 when the last verification found Pathling equal to the source (or repaired it), else 0",
            Family::default(),
        );
        let last_verification = r.gauge(
            "last_verification_timestamp_seconds",
            "When each BulkExportSync's last verification finished (Unix time)",
            Family::default(),
        );
        let relay_changes = r.counter(
            "relay_changes",
            "Changes the relay received, applied to Pathling, or failed to apply, per FhirSubscriptionSync",
            Family::default(),
        );
        let relay_writes =
            r.counter("relay_writes", "Writes the relay sent to Pathling (batches and DELETEs)", Family::default());
        let relay_catch_ups =
            r.counter("relay_catch_ups", "Catch-up runs the relay requested after missing changes", Family::default());
        let relay_lag = r.add(
            "relay_lag_seconds",
            "Seconds from a change at the source to Pathling accepting it",
            Histogram::new(exponential_buckets(0.05, 2.0, 16)),
            &["_bucket", "_sum", "_count"],
        );
        let relay_pending_bytes = r.gauge(
            "relay_pending_bytes",
            "Bytes of notifications the relay holds until Pathling accepts them",
            Gauge::default(),
        );
        Self {
            relay_changes,
            relay_writes,
            relay_catch_ups,
            relay_lag,
            relay_pending_bytes,
            drift,
            in_sync,
            last_verification,
            run_tasks,
            run_clock,
            registry: r.registry,
            samples: r.samples,
            status_conflicts,
            reconciles,
            reconcile_failures,
            runs,
            run_duration,
            resources_imported,
            bytes_transferred,
            watermark_age,
            last_success,
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn every_metric_the_dashboard_queries_is_exported() {
        let dash: serde_json::Value =
            serde_json::from_str(include_str!("../charts/fhirsync/dashboards/fhirsync.json")).expect("dashboard JSON");
        let exported: BTreeSet<String> = Metrics::default().samples.into_iter().collect();
        let mut queried = BTreeSet::new();
        for p in dash["panels"].as_array().expect("panels") {
            for t in p["targets"].as_array().into_iter().flatten() {
                let expr = t["expr"].as_str().expect("expr");
                for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                    if word.starts_with("fhirsync_") {
                        queried.insert(word.to_string());
                    }
                }
            }
        }
        assert!(queried.len() >= 8, "{queried:?}");
        let missing: Vec<&String> = queried.iter().filter(|q| !exported.contains(*q)).collect();
        assert!(missing.is_empty(), "the dashboard queries metrics the operator does not export: {missing:?}");
    }
}
