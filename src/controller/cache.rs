//! What the controllers watch: each kind once, slimmed before it is cached (no managedFields, no
//! last-applied annotation), filtered by predicates so a controller is not woken by status writes it
//! does not need, and — for BulkExportRuns, which two controllers need — one shared watch with an
//! index from owner to runs, so a sync finds its runs without a LIST.

use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, RwLock};

use futures::{Stream, StreamExt, TryStreamExt};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::watcher::{self, Event};
use kube::runtime::{WatchStreamExt, predicates};
use kube::{Client, Resource, ResourceExt};

use crate::api::{ANNOTATION_RESET_WATERMARK, ANNOTATION_RUN_NOW, BulkExportRun};

const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Drops what no controller reads from a cached object.
pub fn slim<K: Resource>(o: &mut K) {
    o.managed_fields_mut().clear();
    o.annotations_mut().remove(LAST_APPLIED);
}

/// [`slim`], and a finished run's template: runs stay cached up to `historyLimit` per sync, and only
/// an unfinished run's task reads its template from the cache (cleanup reads the run anew).
pub fn slim_run(r: &mut BulkExportRun) {
    slim(r);
    if r.status.as_ref().is_some_and(|s| s.phase.is_finished()) {
        r.spec.template = None;
    }
}

/// A hash of what reconciling an object depends on besides its status: generation, finalizers,
/// deletion, and fhirsync's annotations. Status writes leave it unchanged.
pub fn not_status<K: Resource>(o: &K) -> Option<u64> {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    predicates::generation(o).hash(&mut h);
    predicates::finalizers(o).hash(&mut h);
    o.meta().deletion_timestamp.as_ref().map(|t| t.0.as_second()).hash(&mut h);
    for a in [ANNOTATION_RUN_NOW, ANNOTATION_RESET_WATERMARK, crate::api::ANNOTATION_VERIFY_NOW] {
        o.annotations().get(a).hash(&mut h);
    }
    Some(h.finish())
}

/// Runs by the uid of their owning sync, kept from the run watch (every namespace watched).
#[derive(Default)]
pub struct RunIndex {
    by_owner: RwLock<HashMap<String, HashSet<ObjectRef<BulkExportRun>>>>,
    stores: RwLock<Vec<Store<BulkExportRun>>>,
}

fn owners(r: &BulkExportRun) -> impl Iterator<Item = String> + '_ {
    r.owner_references().iter().map(|o| o.uid.clone())
}

impl RunIndex {
    /// The cached runs owned by the sync with `uid`.
    pub fn runs_of(&self, uid: &str) -> Vec<Arc<BulkExportRun>> {
        let refs: Vec<ObjectRef<BulkExportRun>> = self
            .by_owner
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(uid)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default();
        let stores = self.stores.read().unwrap_or_else(|p| p.into_inner());
        refs.iter().filter_map(|r| stores.iter().find_map(|s| s.get(r))).collect()
    }

    fn insert(&self, r: &BulkExportRun) {
        let key = ObjectRef::from_obj(r);
        let mut m = self.by_owner.write().unwrap_or_else(|p| p.into_inner());
        for o in owners(r) {
            m.entry(o).or_default().insert(key.clone());
        }
    }

    fn remove(&self, r: &BulkExportRun) {
        let key = ObjectRef::from_obj(r);
        let mut m = self.by_owner.write().unwrap_or_else(|p| p.into_inner());
        for o in owners(r) {
            if let Some(s) = m.get_mut(&o) {
                s.remove(&key);
                if s.is_empty() {
                    m.remove(&o);
                }
            }
        }
    }

    /// Drops entries of namespace scope `ns` that a relist did not bring back.
    fn retain_seen(&self, ns: &Option<String>, seen: &HashSet<ObjectRef<BulkExportRun>>) {
        let mut m = self.by_owner.write().unwrap_or_else(|p| p.into_inner());
        for set in m.values_mut() {
            set.retain(|r| seen.contains(r) || ns.as_ref().is_some_and(|n| r.namespace.as_deref() != Some(n.as_str())));
        }
        m.retain(|_, s| !s.is_empty());
    }
}

/// The shared run watch of one namespace scope: the root stream (for the run controller, which
/// drives it), its store, and a stream of finished runs for the sync controller (the only run
/// changes a sync reacts to).
#[allow(clippy::type_complexity)]
pub fn run_watch(
    client: &Client,
    ns: &Option<String>,
    index: Arc<RunIndex>,
) -> (
    impl Stream<Item = Result<BulkExportRun, watcher::Error>> + Send + 'static,
    Store<BulkExportRun>,
    impl Stream<Item = Arc<BulkExportRun>> + Send + 'static,
) {
    let api = super::scoped_api::<BulkExportRun>(client, ns);
    let writer = reflector::store::Writer::new_shared(4096, ());
    let store = writer.as_reader();
    index.stores.write().unwrap_or_else(|p| p.into_inner()).push(store.clone());
    let finished = writer
        .subscribe()
        .map(|s| s.filter(|r| std::future::ready(r.status.as_ref().is_some_and(|s| s.phase.is_finished()))).boxed())
        .unwrap_or_else(|| futures::stream::empty().boxed());
    let scope = ns.clone();
    let mut relist: Option<HashSet<ObjectRef<BulkExportRun>>> = None;
    let root = watcher(api)
        .modify(slim_run)
        .map_ok(move |ev| {
            match &ev {
                Event::Apply(r) => index.insert(r),
                Event::Delete(r) => index.remove(r),
                Event::Init => relist = Some(HashSet::new()),
                Event::InitApply(r) => {
                    index.insert(r);
                    if let Some(s) = relist.as_mut() {
                        s.insert(ObjectRef::from_obj(r));
                    }
                }
                Event::InitDone => {
                    if let Some(seen) = relist.take() {
                        index.retain_seen(&scope, &seen);
                    }
                }
            }
            ev
        })
        .reflect_shared(writer)
        .applied_objects()
        .predicate_filter(not_status::<BulkExportRun>, Default::default());
    (root, store, finished)
}

fn watcher<K>(api: kube::Api<K>) -> impl Stream<Item = Result<Event<K>, watcher::Error>> + Send + 'static
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    watcher::watcher(api, watcher::Config::default().any_semantic()).default_backoff()
}

/// A slimmed, cached watch of `K` in one namespace scope that passes on only changes that are not
/// status writes: the trigger stream and store for `Controller::for_stream`.
pub fn watch<K>(
    client: &Client,
    ns: &Option<String>,
) -> (impl Stream<Item = Result<K, watcher::Error>> + Send + 'static, Store<K>)
where
    K: Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let api = super::scoped_api::<K>(client, ns);
    let (store, writer) = reflector::store();
    let stream = watcher(api)
        .modify(slim)
        .reflect(writer)
        .applied_objects()
        .predicate_filter(not_status::<K>, Default::default());
    (stream, store)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::BulkExportRunStatus;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

    fn run(name: &str, owner: &str) -> BulkExportRun {
        let mut r: BulkExportRun =
            serde_json::from_value(serde_json::json!({"apiVersion": "fhirsync.io/v1alpha1", "kind": "BulkExportRun",
                "metadata": {"name": name, "namespace": "ns", "generation": 1}, "spec": {"syncRef": {"name": "s"}}}))
            .unwrap();
        r.metadata.owner_references =
            Some(vec![OwnerReference { uid: owner.into(), name: "s".into(), ..Default::default() }]);
        r
    }

    #[test]
    fn status_writes_do_not_change_the_predicate() {
        let mut r = run("a", "u1");
        let before = not_status(&r);
        r.status = Some(BulkExportRunStatus { message: Some("x".into()), ..Default::default() });
        assert_eq!(not_status(&r), before);
        r.metadata.finalizers = Some(vec!["f".into()]);
        assert_ne!(not_status(&r), before);
        let mut r2 = run("a", "u1");
        r2.annotations_mut().insert(ANNOTATION_RUN_NOW.into(), "1".into());
        assert_ne!(not_status(&r2), before);
    }

    #[test]
    fn the_index_follows_applies_deletes_and_relists() {
        let idx = RunIndex::default();
        let (a, b) = (run("a", "u1"), run("b", "u1"));
        idx.insert(&a);
        idx.insert(&b);
        assert_eq!(idx.by_owner.read().unwrap()["u1"].len(), 2);
        idx.remove(&a);
        assert_eq!(idx.by_owner.read().unwrap()["u1"].len(), 1);
        let seen = HashSet::new();
        idx.retain_seen(&Some("other".into()), &seen);
        assert_eq!(idx.by_owner.read().unwrap()["u1"].len(), 1, "another namespace's relist leaves it");
        idx.retain_seen(&Some("ns".into()), &seen);
        assert!(idx.by_owner.read().unwrap().is_empty(), "its own relist without it drops it");
    }
}
