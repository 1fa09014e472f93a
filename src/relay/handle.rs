//! One notification's way through the relay, after admission: read, checked for gaps, resolved
//! (`id-only` resources read from the source), committed with the other changes in flight, and
//! answered; and what the relay does when it knows it missed changes.

use crate::fhir::class::Class;
use std::sync::atomic::Ordering;
use std::time::Instant;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use reqwest::header::ACCEPT;
use reqwest::{Method, StatusCode};
use serde_json::value::RawValue;

use super::commit::{self, Outcome, Write};
use super::notify::{self, Change, Notification};
use super::{Answer, CATCH_UP_EVERY, CatchUpRequest, Incoming, READ_MAX, Relay, SyncRelay, key};
use crate::fhir::client::{Error as HttpError, HttpClient, Request, read_capped};
use crate::metrics::SyncLabels;

impl SyncRelay {
    /// The source was asked to send again: until a notification is applied, it may give up on some,
    /// so the next applied one starts a catch-up.
    pub fn asked_to_come_back(&self) {
        self.outage.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert_with(Instant::now);
    }
}

impl Relay {
    pub(super) async fn handle_inner(&self, s: &SyncRelay, req: &mut Incoming<'_>) -> Answer {
        let a = self.pipeline(s, req).await;
        if a.status == 503 {
            s.asked_to_come_back();
        }
        a
    }

    async fn pipeline(&self, s: &SyncRelay, req: &mut Incoming<'_>) -> Answer {
        let body = req.body.release();
        let parsed = match req.rest {
            [] if req.method == "POST" => notify::post(&body, req.medplum_deleted),
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
        let mut unreadable = None;
        for c in changes {
            match c {
                Change::Upsert { type_, id, resource, changed_at } => {
                    writes.push(Write::Upsert { type_, id, resource, at: changed_at })
                }
                Change::Delete { type_, id } => writes.push(Write::Delete { type_, id }),
                Change::Read { type_, id } => match self.read_resource(s, &type_, &id).await {
                    Ok(Some((resource, at))) if self.budget.grow(&mut req.body, resource.get().len()) => {
                        writes.push(Write::Upsert { type_, id, resource, at })
                    }
                    Ok(Some(_)) => {
                        return Answer::come_back(
                            "the relay holds as many changes as it may; send this again later",
                            5,
                        );
                    }
                    Ok(None) => writes.push(Write::Delete { type_, id }),
                    Err(e) if matches!(crate::fhir::class::classify(&e), Class::Permanent | Class::Unsupported) => {
                        s.count(&self.metrics, "failed", 1);
                        let m = format!("{type_}/{id} could not be read from the source: {e}");
                        self.missed(s, &m);
                        unreadable = Some(m);
                    }
                    Err(e) => {
                        return Answer::come_back(format!("reading {type_}/{id} from the source: {e}"), 10);
                    }
                },
            }
        }
        let outcomes = s.committer.submit(writes, std::mem::take(&mut req.body)).await;
        let unavailable = outcomes.iter().find_map(|o| match o {
            Outcome::Unavailable(m) => Some(m.clone()),
            _ => None,
        });
        let rejected = outcomes.iter().find_map(|o| match o {
            Outcome::Rejected(m) => Some(m.clone()),
            _ => None,
        });
        if let Some(m) = unavailable {
            return Answer::come_back(format!("Pathling is unavailable: {m}"), commit::COME_BACK.as_secs());
        }
        if let Some(since) = s.outage.lock().unwrap_or_else(|p| p.into_inner()).take() {
            self.missed(
                s,
                &format!(
                    "the relay was unavailable to the source for {}s (Pathling down, or the relay full); sources may have given up on notifications meanwhile",
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
        if let Some(m) = unreadable {
            // the others are applied; this one is not, and is not acknowledged (a catch-up brings it)
            return Answer::new(422, m);
        }
        Answer::new(200, "applied")
    }

    async fn read_resource(&self, s: &SyncRelay, type_: &str, id: &str) -> Result<Option<Read>, HttpError> {
        let _permit = self.reads.acquire().await;
        read(&s.cfg.source, type_, id).await
    }

    /// Records what was missed and asks for a catch-up (at most every 30 s per sync).
    pub(super) fn missed(&self, s: &SyncRelay, why: &str) {
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
            why: format!("the relay missed changes ({why})"),
        });
    }
}

/// Reads a resource from the source: `Some` when it exists (checked to be that resource), `None`
/// when the source says it is gone (404, 410).
/// A resource read from the source, and its `meta.lastUpdated`.
type Read = (Box<RawValue>, Option<Timestamp>);

async fn read(source: &HttpClient, type_: &str, id: &str) -> Result<Option<Read>, HttpError> {
    let url = source.url_segments(&[type_, id]);
    let resp = source.send(Request::new(Method::GET, url.clone()).header(ACCEPT, "application/fhir+json")).await?;
    match resp.status() {
        StatusCode::OK => {
            let body = read_capped(resp, READ_MAX, "a resource").await?;
            match notify::rest_hook("PUT", type_, id, &body) {
                Ok(Notification::Change(Change::Upsert { resource, changed_at, .. })) => {
                    Ok(Some((resource, changed_at)))
                }
                _ => Err(HttpError::Protocol {
                    url: crate::text::redact(&url),
                    message: format!("the source answered {type_}/{id} with something else"),
                }),
            }
        }
        s if crate::fhir::class::gone(s.as_u16()) => Ok(None),
        _ => Err(HttpError::from_response(&Method::GET, resp).await),
    }
}
