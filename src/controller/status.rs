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
}

/// Applies `status` to the object `name` if its resourceVersion is still `rv` (when given).
pub async fn apply<K, S>(api: &Api<K>, name: &str, rv: Option<&str>, status: &S) -> Result<Applied, kube::Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
    S: Serialize,
{
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
