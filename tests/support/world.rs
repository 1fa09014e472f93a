//! The end-to-end world of a BulkExportSync test: a namespace on the test API server, a source and a
//! Pathling double, a staging directory, and the operator.

use fhirsync::api::{BulkExportRun, BulkExportSync, Phase};
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, ResourceExt};
use serde_json::json;

use super::cluster::{self, Operator};
use super::pathling::{FakePathling, PathlingConfig};
use super::source::{FakeSource, SourceConfig, resources};

pub struct World {
    pub ns: String,
    pub source: FakeSource,
    pub pathling: FakePathling,
    pub dir: tempfile::TempDir,
    pub syncs: Api<BulkExportSync>,
    pub runs: Api<BulkExportRun>,
}

impl World {
    pub async fn new(test: &str, cfg: SourceConfig) -> Self {
        let client = cluster::client().await;
        cluster::install_crds(&client).await;
        let ns = cluster::namespace(test);
        let dir = tempfile::tempdir().unwrap();
        let pcfg = PathlingConfig {
            roots: vec![("file:///usr/share/staging".into(), dir.path().join("staging"))],
            ..Default::default()
        };
        Self {
            syncs: Api::namespaced(client.clone(), &ns),
            runs: Api::namespaced(client.clone(), &ns),
            ns,
            source: FakeSource::start(cfg).await,
            pathling: FakePathling::start(pcfg).await,
            dir,
        }
    }

    pub fn operator(&self) -> Operator {
        Operator::start(&self.ns, self.dir.path(), &[])
    }

    pub fn sync_manifest(&self, name: &str, extra: serde_json::Value) -> serde_json::Value {
        let mut spec = json!({
            "source": {"url": self.source.base},
            "target": {"url": self.pathling.base},
            "staging": {"volume": {"path": self.dir.path().join("staging").display().to_string(),
                                   "pathlingPath": "file:///usr/share/staging"}},
            "sinceOverlap": "1m",
        });
        if let (Some(s), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                s.insert(k.clone(), v.clone());
            }
        }
        json!({"apiVersion": "fhirsync.io/v1alpha1", "kind": "BulkExportSync",
               "metadata": {"name": name, "namespace": self.ns}, "spec": spec})
    }

    pub async fn apply_sync(&self, name: &str, extra: serde_json::Value) -> BulkExportSync {
        let m = self.sync_manifest(name, extra);
        self.syncs.patch(name, &PatchParams::apply("e2e").force(), &Patch::Apply(&m)).await.expect("apply sync")
    }

    pub async fn runs_of(&self, sync: &str) -> Vec<BulkExportRun> {
        let mut v = self
            .runs
            .list(&ListParams::default().labels(&format!("fhirsync.io/sync={}", fhirsync::sync::label_value(sync))))
            .await
            .unwrap()
            .items;
        v.sort_by_key(|r| r.creation_timestamp());
        v
    }
}

pub fn data() -> SourceConfig {
    SourceConfig {
        files: vec![
            ("Patient".into(), resources("Patient", "p", 24)),
            ("Observation".into(), resources("Observation", "o", 2217)),
        ],
        ..Default::default()
    }
}

pub fn ready(s: &BulkExportSync) -> Option<(String, String)> {
    let c = s.status.as_ref()?.conditions.iter().find(|c| c.type_ == "Ready")?;
    Some((c.status.clone(), c.reason.clone()))
}

pub fn phase(r: &BulkExportRun) -> Phase {
    r.status.as_ref().map(|s| s.phase).unwrap_or_default()
}
