//! Group commit into Pathling. Changes queue up while a write is in flight; the next write takes all
//! of them at once: one `batch` of PUTs (the latest change per resource wins) and a DELETE per deleted
//! resource. On an idle system a change is written at once; under load, a thousand changes cost a
//! handful of writes. Every submitter learns the outcome of its own changes: a source is acknowledged
//! only once Pathling accepted.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use jiff::Timestamp;
use serde_json::value::RawValue;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::budget::Held;
use crate::fhir::class::{Class, classify};
use crate::fhir::client::Error as HttpError;
use crate::pathling::{BATCH_MAX, PathlingClient, Put};

/// Bytes of resources in one batch (a larger resource goes alone, as a PUT).
pub const BATCH_BYTES: usize = 2 << 20;
/// How long a write is retried (busy or transient Pathling) before its sources are told to come back.
pub const RETRY_FOR: Duration = Duration::from_secs(5);
/// What sources are told to wait when Pathling is unavailable.
pub const COME_BACK: Duration = Duration::from_secs(10);
/// Under load (the last write ended moments ago), how long a group waits for the changes its
/// sources send right after their acknowledgements — so that groups stay full instead of
/// alternating full and nearly empty. An idle relay writes at once.
const LINGER: Duration = Duration::from_millis(20);
/// DELETEs sent at once.
const PARALLEL_DELETES: usize = 4;

/// A change ready to be written.
#[derive(Debug, Clone)]
pub enum Write {
    /// `at`: the resource's `meta.lastUpdated` at the source, when it says.
    Upsert {
        type_: String,
        id: String,
        resource: Box<RawValue>,
        at: Option<Timestamp>,
    },
    Delete {
        type_: String,
        id: String,
    },
}

/// Versions written lately, per resource: the newest source date written, and whether a delete came
/// after it. An older version arriving late (a retried notification, a slow read) does not overwrite
/// a newer one, and no version up to the newest one seen brings back a resource deleted after it.
/// Bounded; forgotten in bulk when full.
#[derive(Default)]
struct Recent(HashMap<(String, String), Seen>);

/// What is known of one resource's latest change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Seen {
    /// The newest `meta.lastUpdated` written.
    newest: Timestamp,
    /// A delete was written after it.
    deleted: bool,
}

impl Seen {
    /// Whether an upsert dated `at` is older than what this says is in Pathling (or gone from it).
    fn supersedes(&self, at: Timestamp) -> bool {
        if self.deleted { at <= self.newest } else { at < self.newest }
    }
    /// What is known after `w` (a delete keeps the newest date it follows).
    fn after(seen: Option<Seen>, w: &Write) -> Option<Seen> {
        match (w, seen) {
            (Write::Upsert { at: Some(at), .. }, Some(s)) => {
                Some(Seen { newest: s.newest.max(*at), deleted: s.deleted && *at <= s.newest })
            }
            (Write::Upsert { at: Some(at), .. }, None) => Some(Seen { newest: *at, deleted: false }),
            (Write::Upsert { at: None, .. }, s) => s.map(|s| Seen { deleted: false, ..s }),
            (Write::Delete { .. }, s) => s.map(|s| Seen { deleted: true, ..s }),
        }
    }
}

const RECENT_MAX: usize = 10_000;

impl Recent {
    fn superseded(&self, w: &Write) -> bool {
        match w {
            Write::Upsert { at: Some(at), .. } => self.0.get(&w.key()).is_some_and(|s| s.supersedes(*at)),
            _ => false,
        }
    }
    fn seen(&self, w: &Write) -> Option<Seen> {
        self.0.get(&w.key()).copied()
    }
    fn written(&mut self, w: &Write) {
        match Seen::after(self.seen(w), w) {
            Some(s) => {
                if self.0.len() >= RECENT_MAX {
                    self.0.clear();
                }
                self.0.insert(w.key(), s);
            }
            None => drop(self.0.remove(&w.key())),
        }
    }
}

/// Whether `w` loses against what came before it for the same resource: an older upsert than the
/// newest seen, or one no newer than the version a later delete removed.
fn loses(w: &Write, before: Option<Seen>) -> bool {
    matches!((w, before), (Write::Upsert { at: Some(at), .. }, Some(s)) if s.supersedes(*at))
}

impl Write {
    fn key(&self) -> (String, String) {
        match self {
            Write::Upsert { type_, id, .. } | Write::Delete { type_, id } => (type_.clone(), id.clone()),
        }
    }
    fn bytes(&self) -> usize {
        match self {
            Write::Upsert { resource, .. } => resource.get().len(),
            Write::Delete { .. } => 64,
        }
    }
}

/// What became of a change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Pathling accepted it.
    Applied,
    /// Pathling is unavailable: the source should send it again later.
    Unavailable(String),
    /// Pathling refused it for good (the change is lost to push; a catch-up brings it).
    Rejected(String),
}

/// What one write did, for the sync's counters.
#[derive(Debug, Clone, Copy, Default)]
pub struct WriteReport {
    pub applied: usize,
    pub failed: usize,
    pub requests: usize,
    /// The oldest change's wait from receipt to acceptance.
    pub oldest: Duration,
}

struct Job {
    write: Write,
    at: Instant,
    reply: oneshot::Sender<Outcome>,
    /// The notification's bytes stay counted against the relay's budget while its changes wait.
    _hold: Arc<Held>,
}

/// Receives each write's report.
pub type Report = Arc<dyn Fn(WriteReport) + Send + Sync>;

/// The committer of one sync's target.
#[derive(Clone)]
pub struct Committer {
    tx: mpsc::UnboundedSender<Job>,
}

impl Committer {
    /// Starts the commit loop for `pathling`; it ends with `stop` or when the committer is dropped.
    pub fn start(pathling: PathlingClient, report: Report, stop: CancellationToken) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(pathling, rx, report, stop));
        Self { tx }
    }

    /// Submits changes and waits for their outcomes (in order); `hold` (the notification's counted
    /// bytes) is let go when the last of them is written or given up.
    pub async fn submit(&self, writes: Vec<Write>, hold: Held) -> Vec<Outcome> {
        let hold = Arc::new(hold);
        let mut waits = vec![];
        for w in writes {
            let (reply, rx) = oneshot::channel();
            if self.tx.send(Job { write: w, at: Instant::now(), reply, _hold: hold.clone() }).is_err() {
                waits.push(None);
            } else {
                waits.push(Some(rx));
            }
        }
        let mut out = vec![];
        for w in waits {
            out.push(match w {
                Some(rx) => rx.await.unwrap_or_else(|_| Outcome::Unavailable("the relay is stopping".into())),
                None => Outcome::Unavailable("the relay is stopping".into()),
            });
        }
        out
    }
}

async fn run(pathling: PathlingClient, mut rx: mpsc::UnboundedReceiver<Job>, report: Report, stop: CancellationToken) {
    // a change that did not fit the last group starts the next
    let mut carry: Option<Job> = None;
    let mut last_write: Option<Instant> = None;
    let mut recent = Recent::default();
    loop {
        let first = match carry.take() {
            Some(j) => j,
            None => tokio::select! {
                j = rx.recv() => match j { Some(j) => j, None => return },
                _ = stop.cancelled() => return,
            },
        };
        // the source hung up: nobody waits for this change (it sends it again), do not write it
        if first.reply.is_closed() {
            continue;
        }
        let mut jobs = vec![first];
        let mut bytes = jobs[0].write.bytes();
        let linger = last_write.is_some_and(|t| t.elapsed() < LINGER).then(|| tokio::time::Instant::now() + LINGER);
        while jobs.len() < BATCH_MAX {
            let next = match linger {
                Some(until) => match tokio::time::timeout_at(until, rx.recv()).await {
                    Ok(Some(j)) => Ok(j),
                    _ => Err(()),
                },
                None => rx.try_recv().map_err(|_| ()),
            };
            match next {
                Ok(j) if j.reply.is_closed() => {}
                Ok(j) if bytes + j.write.bytes() > BATCH_BYTES => {
                    carry = Some(j);
                    break;
                }
                Ok(j) => {
                    bytes += j.write.bytes();
                    jobs.push(j);
                }
                Err(_) => break,
            }
        }
        let oldest = jobs.iter().map(|j| j.at).min().unwrap_or_else(Instant::now);
        let (outcomes, requests) = commit(&pathling, &jobs, &stop, &mut recent).await;
        last_write = Some(Instant::now());
        let mut r = WriteReport { requests, oldest: oldest.elapsed(), ..Default::default() };
        for (job, o) in jobs.into_iter().zip(outcomes) {
            match &o {
                Outcome::Applied => r.applied += 1,
                Outcome::Rejected(_) => r.failed += 1,
                Outcome::Unavailable(_) => {}
            }
            let _ = job.reply.send(o);
        }
        report(r);
    }
}

/// Writes one group; returns each job's outcome and the requests sent.
async fn commit(
    pathling: &PathlingClient,
    jobs: &[Job],
    stop: &CancellationToken,
    recent: &mut Recent,
) -> (Vec<Outcome>, usize) {
    // the latest change per resource wins (by the source's date, else by arrival; a delete wins
    // against versions up to the newest it followed); every job for it shares its outcome
    let mut last: HashMap<(String, String), usize> = HashMap::new();
    let mut seen: HashMap<(String, String), Option<Seen>> = HashMap::new();
    for (i, j) in jobs.iter().enumerate() {
        let k = j.write.key();
        let before = *seen.entry(k.clone()).or_insert_with(|| recent.seen(&j.write));
        if last.contains_key(&k) && loses(&j.write, before) {
            continue;
        }
        seen.insert(k.clone(), Seen::after(before, &j.write));
        last.insert(k, i);
    }
    let mut result: HashMap<usize, Outcome> = HashMap::new();
    let mut winners: Vec<usize> = vec![];
    for i in last.values().copied() {
        if recent.superseded(&jobs[i].write) {
            // a newer version is in Pathling already: this one is done
            result.insert(i, Outcome::Applied);
        } else {
            winners.push(i);
        }
    }
    winners.sort_unstable();
    let upserts: Vec<usize> =
        winners.iter().copied().filter(|i| matches!(jobs[*i].write, Write::Upsert { .. })).collect();
    let deletes: Vec<usize> =
        winners.iter().copied().filter(|i| matches!(jobs[*i].write, Write::Delete { .. })).collect();
    let mut requests = 0;
    if !upserts.is_empty() {
        let puts: Vec<Put<'_>> = upserts
            .iter()
            .filter_map(|i| match &jobs[*i].write {
                Write::Upsert { type_, id, resource, .. } => Some(Put { type_, id, resource }),
                Write::Delete { .. } => None,
            })
            .collect();
        // one resource: a plain PUT (no batch to echo it back)
        let (o, n) = if puts.len() == 1 {
            with_retries(stop, || pathling.put(puts[0])).await
        } else {
            with_retries(stop, || pathling.batch_put(&puts)).await
        };
        requests += n;
        match o {
            Ok(()) => upserts.iter().for_each(|i| drop(result.insert(*i, Outcome::Applied))),
            Err(Outcome::Rejected(why)) if puts.len() > 1 => {
                // one bad entry fails Pathling's whole batch: find it, write the others
                tracing::warn!(error = %why, entries = puts.len(), "Pathling refused a batch; writing its entries one by one");
                let mut gone: Option<Outcome> = None;
                for (i, p) in upserts.iter().zip(&puts) {
                    if let Some(o) = &gone {
                        result.insert(*i, o.clone());
                        continue;
                    }
                    let (o, n) = with_retries(stop, || pathling.put(*p)).await;
                    requests += n;
                    let o = o.err().unwrap_or(Outcome::Applied);
                    // Pathling went away meanwhile: the rest waits for the sources to send again
                    if matches!(o, Outcome::Unavailable(_)) {
                        gone = Some(o.clone());
                    }
                    result.insert(*i, o);
                }
            }
            Err(o) => upserts.iter().for_each(|i| drop(result.insert(*i, o.clone()))),
        }
    }
    if !deletes.is_empty() {
        let done: Vec<(usize, Outcome, usize)> = futures::stream::iter(deletes.iter().copied())
            .map(|i| async move {
                let (type_, id) = jobs[i].write.key();
                let (o, n) = with_retries(stop, || pathling.delete_resource(&type_, &id)).await;
                (i, o.err().unwrap_or(Outcome::Applied), n)
            })
            .buffer_unordered(PARALLEL_DELETES)
            .collect()
            .await;
        for (i, o, n) in done {
            requests += n;
            result.insert(i, o);
        }
    }
    for i in &winners {
        if result.get(i) == Some(&Outcome::Applied) {
            recent.written(&jobs[*i].write);
        }
    }
    let outcomes =
        jobs.iter().map(|j| result.get(&last[&j.write.key()]).cloned().unwrap_or(Outcome::Applied)).collect();
    (outcomes, requests)
}

/// Runs `f` until it succeeds, fails for good, or [`RETRY_FOR`] has passed; returns the requests sent.
async fn with_retries<F, Fut>(stop: &CancellationToken, f: F) -> (Result<(), Outcome>, usize)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<(), HttpError>>,
{
    let start = Instant::now();
    let mut n = 0;
    let mut failures = crate::fhir::retry::rules::RELAY_WRITE.start();
    loop {
        n += 1;
        match f().await {
            Ok(()) => return (Ok(()), n),
            Err(e) => {
                let class = classify(&e);
                let msg = crate::text::peer_text(&e.to_string(), crate::text::PEER_TEXT_MAX);
                if matches!(class, Class::Permanent | Class::Unsupported | Class::Invalid) {
                    return (Err(Outcome::Rejected(msg)), n);
                }
                if class == Class::Auth {
                    // a credential to fix: the source keeps the change and sends it again
                    return (Err(Outcome::Unavailable(msg)), n);
                }
                // a Retry-After of 0 (or in the past) does not make it sooner than the backoff
                let pause = failures.failed(e.retry_after().map(|r| r.min(RETRY_FOR))).unwrap_or(RETRY_FOR);
                if start.elapsed() + pause > RETRY_FOR {
                    return (Err(Outcome::Unavailable(msg)), n);
                }
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = stop.cancelled() => return (Err(Outcome::Unavailable("the relay is stopping".into())), n),
                }
            }
        }
    }
}
