//! The one status writer of the operator: server-side apply (field manager `fhirsync`) of a custom
//! resource's status, guarded by the resourceVersion the decision was made on, so a decision taken on
//! stale data fails with 409 and is taken again on fresh data. Callers write only when the status
//! changed.

use kube::api::{Patch, PatchParams};
use kube::{Api, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::api::FIELD_MANAGER;

/// What a status write did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// Stored; the object's new resourceVersion.
    Written(Option<String>),
    /// The object changed since `resourceVersion` was read: decide again on fresh data.
    Conflict,
    /// The object is gone.
    Gone,
    /// This process no longer holds the lease: nothing was written.
    NotHeld,
}

/// Applies `status` to the object `name` if its resourceVersion is still `rv` (when given) — and
/// only while this process may act ([`crate::fence::Fence::process`]): a leader whose lease lapsed
/// writes nothing, whatever its tasks were doing when it paused.
pub async fn apply<K, S>(api: &Api<K>, name: &str, rv: Option<&str>, status: &S) -> Result<Applied, kube::Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
    S: Serialize,
{
    if !crate::fence::Fence::process().holds() {
        return Ok(Applied::NotHeld);
    }
    let mut metadata = serde_json::Map::new();
    if let Some(rv) = rv {
        metadata.insert("resourceVersion".into(), rv.into());
    }
    let body = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "metadata": metadata,
        "status": status,
    });
    match api.patch_status(name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&body)).await {
        Ok(o) => Ok(Applied::Written(o.resource_version())),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(Applied::Conflict),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(Applied::Gone),
        Err(e) => Err(e),
    }
}

/// What this process last wrote to each object's status, so a reconcile on a cached copy older than
/// its own last write decides on what it wrote (the watch delivers our own writes late when the API
/// server is busy; deciding on the older copy would repeat work and end in a conflict).
pub struct OwnWrites<S> {
    writes: std::sync::Mutex<std::collections::HashMap<String, Write<S>>>,
}

struct Write<S> {
    /// The resourceVersion the write was guarded by, and the one it produced.
    before: Option<String>,
    after: Option<String>,
    status: S,
}

impl<S> Default for OwnWrites<S> {
    fn default() -> Self {
        Self { writes: std::sync::Mutex::default() }
    }
}

impl<S: Clone> OwnWrites<S> {
    /// When the cached copy (at `cached_rv`) predates this process's last write to `uid`: that
    /// write's resourceVersion and status.
    pub fn newer(&self, uid: &str, cached_rv: Option<&str>) -> Option<(Option<String>, S)> {
        let m = self.writes.lock().unwrap_or_else(|p| p.into_inner());
        m.get(uid).filter(|w| w.before.as_deref() == cached_rv).map(|w| (w.after.clone(), w.status.clone()))
    }

    /// Records a write.
    pub fn record(&self, uid: &str, before: Option<String>, after: Option<String>, status: S) {
        self.writes.lock().unwrap_or_else(|p| p.into_inner()).insert(uid.to_string(), Write { before, after, status });
    }

    /// Forgets an object (deleted).
    pub fn forget(&self, uid: &str) {
        self.writes.lock().unwrap_or_else(|p| p.into_inner()).remove(uid);
    }
}
