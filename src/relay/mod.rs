//! The relay: sources notify fhirsync's receiver, which writes their changes into Pathling in
//! batches. [`notify`] reads what any kind of source sends, [`commit`] groups changes into Pathling
//! writes, [`gaps`] decides when changes were missed, and [`Relay::handle`] is one notification from
//! receipt to acknowledgement — HTTP-agnostic; `receiver` is the HTTP side. No Kubernetes types:
//! the controller configures a [`SyncRelay`] per FhirSubscriptionSync and reads its counters back.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::api::RelayStatus;
use crate::fhir::client::HttpClient;
use crate::metrics::{Metrics, RelayLabels, SyncLabels};
use crate::pathling::PathlingClient;

pub mod budget;
pub mod commit;
pub mod gaps;
mod handle;
pub mod notify;
pub mod receiver;

use budget::{Budget, Held};
use commit::{Committer, WriteReport};

/// Longest a notification's body may take to arrive (a slow sender holds budget meanwhile).
const BODY_TIME: Duration = Duration::from_secs(30);
/// Largest notification body read.
pub const BODY_MAX: usize = 10 << 20;
/// Bytes of notifications (and of resources read for them) held at once until Pathling accepts
/// them, across all syncs: past it, sources are told to come back (503). The relay's share of the
/// operator's memory, worst case: these 10 MiB twice while being parsed, two reads in flight (2 × 4
/// MiB, twice while parsed), a batch (2 MiB) and its answer (≤ 5 MiB) — about 43 MiB.
pub const PENDING_MAX: usize = 10 << 20;
/// Largest resource read from a source for an `id-only` notification (a larger one is refused:
/// 422, and a catch-up brings it).
const READ_MAX: usize = 4 << 20;
/// Resources read from sources at once (their bytes are in memory before they can be counted).
const READS_AT_ONCE: usize = 2;
/// At most one catch-up request per sync in this time.
const CATCH_UP_EVERY: Duration = Duration::from_secs(30);

/// What the controller tells the relay about one FhirSubscriptionSync.
pub struct SyncConfig {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// Reads `id-only` resources (with the source's credential).
    pub source: HttpClient,
    /// Where the changes go (with Pathling's own credential).
    pub pathling: PathlingClient,
    /// The BulkExportSync run when changes were missed.
    pub catch_up: Option<String>,
    /// Identifies the configuration: an unchanged one keeps its committer and counters.
    pub fingerprint: String,
    /// Event numbers seen before (from status), per Subscription id.
    pub last_events: std::collections::BTreeMap<String, i64>,
}

/// A catch-up the relay asks for: run the BulkExportSync `sync` in `namespace`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatchUpRequest {
    pub namespace: String,
    /// The FhirSubscriptionSync that missed changes.
    pub from: String,
    /// The BulkExportSync to run.
    pub sync: String,
    pub why: String,
}

/// One FhirSubscriptionSync's relay.
pub struct SyncRelay {
    cfg: SyncConfig,
    committer: Committer,
    stats: Arc<Mutex<RelayStatus>>,
    tracker: Mutex<gaps::Tracker>,
    dirty: Arc<AtomicBool>,
    /// When Pathling became unavailable (changes may have been dropped by sources meanwhile).
    outage: Mutex<Option<Instant>>,
    last_catch_up: Mutex<Option<Instant>>,
}

/// The relay of this process.
pub struct Relay {
    syncs: RwLock<HashMap<String, Arc<SyncRelay>>>,
    key: ring::hmac::Key,
    /// Every replica has the same key (`--relay-key-file`).
    key_shared: AtomicBool,
    budget: Budget,
    reads: tokio::sync::Semaphore,
    metrics: Arc<Metrics>,
    catch_ups: mpsc::UnboundedSender<CatchUpRequest>,
    stop: CancellationToken,
}

/// The receiver's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    /// Seconds, for 503.
    pub retry_after: Option<u64>,
    pub message: String,
}

impl Answer {
    fn new(status: u16, message: impl Into<String>) -> Self {
        Self { status, retry_after: None, message: message.into() }
    }
    fn come_back(message: impl Into<String>, secs: u64) -> Self {
        Self { status: 503, retry_after: Some(secs), message: message.into() }
    }
}

/// One admitted request to the receiver ([`Relay::admit`]), HTTP aside.
pub struct Incoming<'a> {
    /// Path segments after the sync's own path (`[Type, id]` for a classic rest-hook).
    pub rest: &'a [String],
    pub method: &'a str,
    /// Medplum's `X-Medplum-Deleted-Resource`.
    pub medplum_deleted: Option<&'a str>,
    /// The body, counted against the relay's budget ([`Relay::read`], [`Relay::hold`]).
    pub body: Held,
}

/// `Bearer {uid}.{tag}` → (uid, tag); `Bearer {tag}` → (None, tag).
fn bearer(authorization: Option<&str>) -> Option<(Option<&str>, &str)> {
    let token = authorization?.trim().strip_prefix("Bearer ")?.trim();
    Some(match token.split_once('.') {
        Some((uid, tag)) => (Some(uid), tag),
        None => (None, token),
    })
}

fn key(ns: &str, name: &str) -> String {
    format!("{ns}/{name}")
}

impl Relay {
    /// A relay whose per-sync credentials derive from `secret` (every replica must share it).
    /// Returns the catch-up requests to carry out.
    pub fn new(
        secret: &[u8],
        metrics: Arc<Metrics>,
        stop: CancellationToken,
    ) -> (Arc<Self>, mpsc::UnboundedReceiver<CatchUpRequest>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let relay = Arc::new(Self {
            syncs: RwLock::default(),
            key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret),
            key_shared: AtomicBool::new(true),
            budget: Budget::new(PENDING_MAX, BODY_MAX),
            reads: tokio::sync::Semaphore::new(READS_AT_ONCE),
            metrics,
            catch_ups: tx,
            stop,
        });
        (relay, rx)
    }

    /// The credential of the sync with `uid` (what its Subscriptions send as `Authorization: Bearer`):
    /// `{uid}.{tag}`, the tag an HMAC of the uid under the relay key. The uid in it lets any replica
    /// that shares the key check a request before reading its body, without knowing the sync.
    pub fn token(&self, uid: &str) -> String {
        format!("{uid}.{}", self.tag(uid))
    }

    fn tag(&self, uid: &str) -> String {
        use base64::Engine;
        let tag = ring::hmac::sign(&self.key, format!("fhirsync-relay/{uid}").as_bytes());
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(tag.as_ref())
    }

    /// Whether `authorization` carries the credential of the sync with `uid` (checked in constant
    /// time). A bare tag (the form before the uid was added) is still taken.
    fn authorized(&self, uid: &str, authorization: Option<&str>) -> bool {
        match bearer(authorization) {
            Some((Some(u), tag)) => u == uid && self.verify(uid, tag),
            Some((None, tag)) => self.verify(uid, tag),
            None => false,
        }
    }

    fn verify(&self, uid: &str, tag: &str) -> bool {
        use base64::Engine;
        let Ok(tag) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(tag) else { return false };
        ring::hmac::verify(&self.key, format!("fhirsync-relay/{uid}").as_bytes(), &tag).is_ok()
    }

    /// Whether a request a replica passes on to the leader carries a credential fhirsync issued,
    /// checked before its body is read: with a key every replica shares, the tag is verified for
    /// the uid it names; with a key of this process only (no `--relay-key-file`), only its form can
    /// be checked here — the leader checks the rest.
    pub fn vouch(&self, authorization: Option<&str>) -> bool {
        match bearer(authorization) {
            Some((Some(uid), tag)) if self.key_shared.load(Ordering::Relaxed) => self.verify(uid, tag),
            Some((Some(uid), tag)) => {
                uid.len() <= 64
                    && tag.len() == 43
                    && tag.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            }
            _ => false,
        }
    }

    /// Tells the relay its key is this process's own (no `--relay-key-file`): other replicas'
    /// credentials cannot be verified here.
    pub fn key_is_per_process(&self) {
        self.key_shared.store(false, Ordering::Relaxed);
    }

    /// The path of a sync's notifications under the receiver's URL.
    pub fn path(namespace: &str, name: &str) -> String {
        format!("/fss/{namespace}/{name}")
    }

    /// Sets up (or keeps, when unchanged) the relay of one sync.
    pub fn configure(&self, cfg: SyncConfig) {
        let k = key(&cfg.namespace, &cfg.name);
        let mut syncs = self.syncs.write().unwrap_or_else(|p| p.into_inner());
        if syncs.get(&k).is_some_and(|s| s.cfg.fingerprint == cfg.fingerprint && s.cfg.uid == cfg.uid) {
            return;
        }
        let stats = Arc::new(Mutex::new(RelayStatus {
            last_event_numbers: cfg.last_events.clone(),
            ..syncs.get(&k).filter(|s| s.cfg.uid == cfg.uid).map(|s| s.snapshot()).unwrap_or_default()
        }));
        let dirty = Arc::new(AtomicBool::new(false));
        let (s2, d2, m2) = (stats.clone(), dirty.clone(), self.metrics.clone());
        let labels = SyncLabels { namespace: cfg.namespace.clone(), name: cfg.name.clone() };
        let report: commit::Report = Arc::new(move |r: WriteReport| {
            let mut st = s2.lock().unwrap_or_else(|p| p.into_inner());
            st.applied += r.applied as i64;
            st.failed += r.failed as i64;
            st.writes += r.requests as i64;
            if r.applied > 0 {
                st.last_applied = Some(Time(Timestamp::now()));
            }
            d2.store(true, Ordering::Relaxed);
            m2.relay_writes.get_or_create(&labels).inc_by(r.requests as u64);
            let l = |result: &str| RelayLabels {
                namespace: labels.namespace.clone(),
                name: labels.name.clone(),
                result: result.into(),
            };
            m2.relay_changes.get_or_create(&l("applied")).inc_by(r.applied as u64);
            m2.relay_changes.get_or_create(&l("failed")).inc_by(r.failed as u64);
        });
        let committer = Committer::start(cfg.pathling.clone(), report, self.stop.child_token());
        let tracker = gaps::Tracker::seeded(cfg.last_events.clone());
        syncs.insert(
            k,
            Arc::new(SyncRelay {
                cfg,
                committer,
                stats,
                tracker: Mutex::new(tracker),
                dirty,
                outage: Mutex::default(),
                last_catch_up: Mutex::default(),
            }),
        );
    }

    /// Asks for a catch-up run for a sync the relay does not carry (`Direct` delivery: fhirsync saw
    /// its target down). `why` is the whole sentence the Event starts with.
    pub fn request_catch_up(&self, req: CatchUpRequest) {
        self.metrics
            .relay_catch_ups
            .get_or_create(&SyncLabels { namespace: req.namespace.clone(), name: req.from.clone() })
            .inc();
        let _ = self.catch_ups.send(req);
    }

    /// Records that a sync's changes may have been missed and asks for its catch-up now (within the
    /// usual bound of one per 30 s): the controller knows when the source will refuse or drop
    /// deliveries — it has just changed the Subscriptions' credential.
    pub fn catch_up_now(&self, namespace: &str, name: &str, why: &str) {
        if let Some(s) = self.sync(namespace, name) {
            self.missed(&s, why);
        }
    }

    /// Stops relaying for a sync (deleted, or no longer in Relay mode).
    pub fn forget(&self, namespace: &str, name: &str) {
        self.syncs.write().unwrap_or_else(|p| p.into_inner()).remove(&key(namespace, name));
    }

    /// The counters of one sync.
    pub fn status(&self, namespace: &str, name: &str) -> Option<RelayStatus> {
        self.syncs.read().unwrap_or_else(|p| p.into_inner()).get(&key(namespace, name)).map(|s| s.snapshot())
    }

    /// The syncs whose counters changed since the last call (and the bytes-held gauge brought up
    /// to date: bytes are let go when Pathling accepted them, away from any request).
    pub fn take_dirty(&self) -> Vec<(String, String)> {
        self.metrics.relay_pending_bytes.set(self.budget.held() as i64);
        self.syncs
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|s| s.dirty.swap(false, Ordering::Relaxed))
            .map(|s| (s.cfg.namespace.clone(), s.cfg.name.clone()))
            .collect()
    }

    fn sync(&self, namespace: &str, name: &str) -> Option<Arc<SyncRelay>> {
        self.syncs.read().unwrap_or_else(|p| p.into_inner()).get(&key(namespace, name)).cloned()
    }

    /// Whether a request for this sync with this credential is taken at all (checked before its body
    /// is read). An unknown sync is asked to come back: a new leader configures its syncs first.
    pub fn admit(&self, namespace: &str, name: &str, authorization: Option<&str>) -> Result<Arc<SyncRelay>, Answer> {
        let Some(s) = self.sync(namespace, name) else {
            return Err(Answer::come_back("no FhirSubscriptionSync in Relay mode is known at this path (yet)", 30));
        };
        if !self.authorized(&s.cfg.uid, authorization) {
            return Err(Answer::new(401, "missing or wrong credential"));
        }
        Ok(s)
    }

    /// Reads a request body within the relay's budget.
    pub async fn read<S, E>(&self, content_length: Option<u64>, body: S) -> Result<Held, Answer>
    where
        S: futures::Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let r = match tokio::time::timeout(BODY_TIME, self.budget.read(content_length, body)).await {
            Ok(r) => r,
            Err(_) => Err(Answer::new(408, "the notification took too long to arrive")),
        };
        self.metrics.relay_pending_bytes.set(self.budget.held() as i64);
        r
    }

    /// Holds a body already in memory within the relay's budget.
    pub fn hold(&self, body: Bytes) -> Result<Held, Answer> {
        self.budget.hold(body)
    }

    /// One notification of the sync `s` ([`Relay::admit`]), from receipt to the answer the source
    /// gets: read, checked for gaps, resolved (`id-only` resources read from the source), written
    /// into Pathling with the other changes in flight, and acknowledged only once Pathling accepted.
    pub async fn handle(&self, s: &SyncRelay, mut req: Incoming<'_>) -> Answer {
        let answer = self.handle_inner(s, &mut req).await;
        drop(req);
        self.metrics.relay_pending_bytes.set(self.budget.held() as i64);
        answer
    }
}

impl SyncRelay {
    fn snapshot(&self) -> RelayStatus {
        self.stats.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn count(&self, metrics: &Metrics, result: &str, n: u64) {
        {
            let mut st = self.stats.lock().unwrap_or_else(|p| p.into_inner());
            match result {
                "received" => st.received += n as i64,
                _ => st.failed += n as i64,
            }
        }
        self.dirty.store(true, Ordering::Relaxed);
        metrics
            .relay_changes
            .get_or_create(&RelayLabels {
                namespace: self.cfg.namespace.clone(),
                name: self.cfg.name.clone(),
                result: result.into(),
            })
            .inc_by(n);
    }
}
