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
use reqwest::header::ACCEPT;
use reqwest::{Method, StatusCode};
use serde_json::value::RawValue;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::api::RelayStatus;
use crate::fhir::client::{Error as HttpError, HttpClient, Request, read_capped};
use crate::metrics::{Metrics, RelayLabels, SyncLabels};
use crate::pathling::PathlingClient;

pub mod budget;
pub mod commit;
pub mod gaps;
pub mod notify;
pub mod receiver;

use budget::{Budget, Held};
use commit::{Committer, Outcome, Write, WriteReport};
use notify::{Change, Content, Notification};

/// Largest notification body read.
pub const BODY_MAX: usize = 16 << 20;
/// Bytes of notifications (and of resources read for them) held at once until Pathling accepts
/// them, across all syncs: past it, sources are told to come back (503). With the reads in flight
/// and the write to Pathling, it keeps the relay's share of the operator's memory under ~40 MiB.
pub const PENDING_MAX: usize = 16 << 20;
/// Largest resource read from a source for an `id-only` notification.
const READ_MAX: usize = 8 << 20;
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
    /// What topic-based Subscriptions were asked to send.
    pub content: Content,
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

/// One request to the receiver, HTTP aside.
pub struct Incoming<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    /// Path segments after the sync's own path (`[Type, id]` for a classic rest-hook).
    pub rest: &'a [String],
    pub method: &'a str,
    pub authorization: Option<&'a str>,
    /// Medplum's `X-Medplum-Deleted-Resource`.
    pub medplum_deleted: Option<&'a str>,
    /// The body, counted against the relay's budget ([`Relay::read`], [`Relay::hold`]).
    pub body: Held,
}

fn key(ns: &str, name: &str) -> String {
    format!("{ns}/{name}")
}

impl Relay {
    /// A relay whose per-sync credentials derive from `secret` (every replica must share it; `None`
    /// makes a random one, valid until the process ends). Returns the catch-up requests to carry out.
    pub fn new(
        secret: Option<&[u8]>,
        metrics: Arc<Metrics>,
        stop: CancellationToken,
    ) -> (Arc<Self>, mpsc::UnboundedReceiver<CatchUpRequest>) {
        let random;
        let secret = match secret {
            Some(s) => s,
            None => {
                let mut b = [0u8; 32];
                let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
                random = b;
                &random
            }
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let relay = Arc::new(Self {
            syncs: RwLock::default(),
            key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret),
            budget: Budget::new(PENDING_MAX, BODY_MAX),
            reads: tokio::sync::Semaphore::new(READS_AT_ONCE),
            metrics,
            catch_ups: tx,
            stop,
        });
        (relay, rx)
    }

    /// The credential of the sync with `uid` (what its Subscriptions send as `Authorization: Bearer`).
    pub fn token(&self, uid: &str) -> String {
        use base64::Engine;
        let tag = ring::hmac::sign(&self.key, format!("fhirsync-relay/{uid}").as_bytes());
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(tag.as_ref())
    }

    /// Whether `authorization` carries the credential of the sync with `uid` (checked in constant time).
    fn authorized(&self, uid: &str, authorization: Option<&str>) -> bool {
        use base64::Engine;
        let Some(token) = authorization.and_then(|a| a.trim().strip_prefix("Bearer ")) else { return false };
        let Ok(tag) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(token.trim()) else { return false };
        ring::hmac::verify(&self.key, format!("fhirsync-relay/{uid}").as_bytes(), &tag).is_ok()
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

    /// Stops relaying for a sync (deleted, or no longer in Relay mode).
    pub fn forget(&self, namespace: &str, name: &str) {
        self.syncs.write().unwrap_or_else(|p| p.into_inner()).remove(&key(namespace, name));
    }

    /// The counters of one sync.
    pub fn status(&self, namespace: &str, name: &str) -> Option<RelayStatus> {
        self.syncs.read().unwrap_or_else(|p| p.into_inner()).get(&key(namespace, name)).map(|s| s.snapshot())
    }

    /// The syncs whose counters changed since the last call.
    pub fn take_dirty(&self) -> Vec<(String, String)> {
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
        let r = self.budget.read(content_length, body).await;
        self.metrics.relay_pending_bytes.set(self.budget.held() as i64);
        r
    }

    /// Holds a body already in memory within the relay's budget.
    pub fn hold(&self, body: Bytes) -> Result<Held, Answer> {
        self.budget.hold(body)
    }

    /// One notification, from receipt to the answer the source gets: authenticated, read, checked
    /// for gaps, resolved (`id-only` resources read from the source), written into Pathling with the
    /// other changes in flight, and acknowledged only once Pathling accepted.
    pub async fn handle(&self, mut req: Incoming<'_>) -> Answer {
        let s = match self.admit(req.namespace, req.name, req.authorization) {
            Ok(s) => s,
            Err(a) => return a,
        };
        let answer = self.handle_inner(&s, &mut req).await;
        drop(req);
        self.metrics.relay_pending_bytes.set(self.budget.held() as i64);
        answer
    }

    async fn handle_inner(&self, s: &SyncRelay, req: &mut Incoming<'_>) -> Answer {
        let body = req.body.release();
        let parsed = match req.rest {
            [] if req.method == "POST" => notify::post(&body, req.medplum_deleted, s.cfg.content),
            [t, id] => notify::rest_hook(req.method, t, id, &body),
            _ => return Answer::new(404, "not a notification path"),
        };
        drop(body);
        let n = match parsed {
            Ok(n) => n,
            Err(e) => {
                s.count(&self.metrics, "failed", 1);
                self.missed(s, &format!("a notification fhirsync could not read: {e}"));
                return Answer::new(400, e.0);
            }
        };
        let changes = match n {
            Notification::Change(c) => vec![c],
            Notification::Topic(t) => {
                let missed = s.tracker.lock().unwrap_or_else(|p| p.into_inner()).observe(&t);
                {
                    let mut st = s.stats.lock().unwrap_or_else(|p| p.into_inner());
                    if t.kind != notify::Kind::Event {
                        st.heartbeats += 1;
                    }
                    if let Some(sub) = t.subscription.as_ref().filter(|x| crate::fhir::ids::is_id(x))
                        && let Some(n) = s.tracker.lock().unwrap_or_else(|p| p.into_inner()).last.get(sub)
                    {
                        st.last_event_numbers.insert(sub.clone(), *n);
                        // bounded: a source cannot grow the status with made-up Subscription ids
                        while st.last_event_numbers.len() > 100 {
                            let Some(k) = st.last_event_numbers.keys().next().cloned() else { break };
                            st.last_event_numbers.remove(&k);
                        }
                    }
                }
                s.dirty.store(true, Ordering::Relaxed);
                if let Some(m) = missed {
                    self.missed(s, &m);
                }
                t.changes
            }
        };
        if changes.is_empty() {
            return Answer::new(200, "ok");
        }
        s.count(&self.metrics, "received", changes.len() as u64);
        let newest = changes
            .iter()
            .filter_map(|c| match c {
                Change::Upsert { changed_at, .. } => *changed_at,
                _ => None,
            })
            .max();
        // id-only: the source says what the resource is now
        let mut writes = vec![];
        for c in changes {
            match c {
                Change::Upsert { type_, id, resource, .. } => writes.push(Write::Upsert { type_, id, resource }),
                Change::Delete { type_, id } => writes.push(Write::Delete { type_, id }),
                Change::Read { type_, id } => match self.read_resource(s, &type_, &id).await {
                    Ok(Some(resource)) if self.budget.grow(&mut req.body, resource.get().len()) => {
                        writes.push(Write::Upsert { type_, id, resource })
                    }
                    Ok(Some(_)) => {
                        return Answer::come_back(
                            "the relay holds as many changes as it may; send this again later",
                            5,
                        );
                    }
                    Ok(None) => writes.push(Write::Delete { type_, id }),
                    Err(e) if matches!(crate::run::policy::classify(&e), crate::run::policy::Class::Permanent) => {
                        s.count(&self.metrics, "failed", 1);
                        self.missed(s, &format!("{type_}/{id} could not be read from the source: {e}"));
                    }
                    Err(e) => {
                        return Answer::come_back(format!("reading {type_}/{id} from the source: {e}"), 10);
                    }
                },
            }
        }
        let outcomes = s.committer.submit(writes).await;
        let unavailable = outcomes.iter().find_map(|o| match o {
            Outcome::Unavailable(m) => Some(m.clone()),
            _ => None,
        });
        let rejected = outcomes.iter().find_map(|o| match o {
            Outcome::Rejected(m) => Some(m.clone()),
            _ => None,
        });
        if let Some(m) = unavailable {
            s.outage.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert_with(Instant::now);
            return Answer::come_back(format!("Pathling is unavailable: {m}"), commit::COME_BACK.as_secs());
        }
        if let Some(since) = s.outage.lock().unwrap_or_else(|p| p.into_inner()).take() {
            self.missed(
                s,
                &format!(
                    "Pathling was unavailable for {}s; sources may have given up on notifications meanwhile",
                    since.elapsed().as_secs()
                ),
            );
        }
        if let Some(t) = newest {
            let lag = Timestamp::now().duration_since(t).as_secs_f64().max(0.0);
            self.metrics.relay_lag.observe(lag);
            s.stats.lock().unwrap_or_else(|p| p.into_inner()).lag_seconds = Some((lag * 1000.0).round() / 1000.0);
        }
        if let Some(m) = rejected {
            self.missed(s, &format!("Pathling refused a change: {m}"));
            return Answer::new(422, format!("Pathling refused a change: {m}"));
        }
        Answer::new(200, "applied")
    }

    async fn read_resource(&self, s: &SyncRelay, type_: &str, id: &str) -> Result<Option<Box<RawValue>>, HttpError> {
        let _permit = self.reads.acquire().await;
        read(&s.cfg.source, type_, id).await
    }

    /// Records what was missed and asks for a catch-up (at most every 30 s per sync).
    fn missed(&self, s: &SyncRelay, why: &str) {
        tracing::warn!(fss = %key(&s.cfg.namespace, &s.cfg.name), why, "the relay missed changes");
        {
            let mut st = s.stats.lock().unwrap_or_else(|p| p.into_inner());
            let mut why = why.to_string();
            crate::text::cut_bytes(&mut why, 1024);
            st.last_missed = Some(why);
            st.last_missed_time = Some(Time(Timestamp::now()));
        }
        s.dirty.store(true, Ordering::Relaxed);
        let Some(sync) = &s.cfg.catch_up else { return };
        let mut last = s.last_catch_up.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_some_and(|l| l.elapsed() < CATCH_UP_EVERY) {
            return;
        }
        *last = Some(Instant::now());
        s.stats.lock().unwrap_or_else(|p| p.into_inner()).catch_ups += 1;
        self.metrics
            .relay_catch_ups
            .get_or_create(&SyncLabels { namespace: s.cfg.namespace.clone(), name: s.cfg.name.clone() })
            .inc();
        let _ = self.catch_ups.send(CatchUpRequest {
            namespace: s.cfg.namespace.clone(),
            from: s.cfg.name.clone(),
            sync: sync.clone(),
            why: why.to_string(),
        });
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

/// Reads a resource from the source: `Some` when it exists (checked to be that resource), `None`
/// when the source says it is gone (404, 410).
async fn read(source: &HttpClient, type_: &str, id: &str) -> Result<Option<Box<RawValue>>, HttpError> {
    let url = source.url_segments(&[type_, id]);
    let resp = source.send(Request::new(Method::GET, url.clone()).header(ACCEPT, "application/fhir+json")).await?;
    match resp.status() {
        StatusCode::OK => {
            let body = read_capped(resp, READ_MAX, "a resource").await?;
            match notify::rest_hook("PUT", type_, id, &body) {
                Ok(Notification::Change(Change::Upsert { resource, .. })) => Ok(Some(resource)),
                _ => Err(HttpError::Protocol {
                    url: crate::text::redact(&url),
                    message: format!("the source answered {type_}/{id} with something else"),
                }),
            }
        }
        StatusCode::NOT_FOUND | StatusCode::GONE => Ok(None),
        _ => Err(HttpError::from_response(&Method::GET, resp).await),
    }
}
