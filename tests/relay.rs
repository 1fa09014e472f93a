//! The relay as sources meet it, without Kubernetes: the receiver's HTTP side in front of
//! `Relay::handle`, writing into the Pathling emulator. Every kind of notification, the credential,
//! gaps and catch-ups, group commit, Pathling being down or refusing, the memory budget, and the
//! hop from a replica that does not relay to the one that does.

mod support;

use std::sync::Arc;
use std::time::Duration;

use fhirsync::fhir::client::{ClientConfig, HttpClient};
use fhirsync::metrics::Metrics;
use fhirsync::pathling::PathlingClient;
use fhirsync::relay::receiver::{Leadership, router};
use fhirsync::relay::{CatchUpRequest, Relay, SyncConfig};
use serde_json::{Value, json};
use support::fhir_server::{FakeFhirServer, ServerConfig};
use support::pathling::{FakePathling, PathlingConfig};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio_util::sync::CancellationToken;

const UID: &str = "uid-feed-1";

struct Harness {
    relay: Arc<Relay>,
    catch_ups: UnboundedReceiver<CatchUpRequest>,
    pathling: FakePathling,
    source: FakeFhirServer,
    /// `http://127.0.0.1:P/fss/ns1/feed`
    url: String,
    token: String,
    http: reqwest::Client,
    _stop: tokio_util::sync::DropGuard,
}

fn http_client(base: &str) -> HttpClient {
    HttpClient::new(&ClientConfig::new(base.parse().unwrap())).unwrap()
}

/// Serves the receiver as the operator does: bounded connections, header deadlines.
async fn serve(relay: Arc<Relay>, leadership: Arc<Leadership>) -> String {
    let listener = fhirsync::serve::bind("127.0.0.1:0".parse().unwrap(), "test receiver").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = router(relay, leadership, false);
    let limits = fhirsync::serve::Limits::RECEIVER;
    tokio::spawn(fhirsync::serve::serve(listener, app, None, limits, CancellationToken::new()));
    addr.to_string()
}

impl Harness {
    async fn start(catch_up: Option<&str>, pcfg: PathlingConfig) -> Self {
        let pathling = FakePathling::start(pcfg).await;
        let source = FakeFhirServer::start(ServerConfig::default()).await;
        let stop = CancellationToken::new();
        let (relay, catch_ups) = Relay::new(b"a shared secret", Arc::new(Metrics::default()), stop.clone());
        relay.configure(SyncConfig {
            namespace: "ns1".into(),
            name: "feed".into(),
            uid: UID.into(),
            source: http_client(&source.base),
            pathling: PathlingClient::new(http_client(&pathling.base)),
            catch_up: catch_up.map(str::to_string),
            fingerprint: "v1".into(),
            last_events: Default::default(),
        });
        let addr = serve(relay.clone(), Arc::new(Leadership::default())).await;
        let token = relay.token(UID);
        Self {
            relay,
            catch_ups,
            pathling,
            source,
            url: format!("http://{addr}{}", Relay::path("ns1", "feed")),
            token,
            http: reqwest::Client::new(),
            _stop: stop.drop_guard(),
        }
    }

    async fn send(&self, method: &str, rest: &str, body: &Value, headers: &[(&str, &str)]) -> (u16, Option<String>) {
        let url = if rest.is_empty() { self.url.clone() } else { format!("{}/{rest}", self.url) };
        let mut rb = self
            .http
            .request(method.parse().unwrap(), url)
            .header("authorization", format!("Bearer {}", self.token))
            .header("content-type", "application/fhir+json");
        if !body.is_null() {
            rb = rb.body(body.to_string());
        }
        for (k, v) in headers {
            rb = rb.header(*k, *v);
        }
        let r = rb.send().await.unwrap();
        let retry = r.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string());
        (r.status().as_u16(), retry)
    }

    fn status(&self) -> fhirsync::api::RelayStatus {
        self.relay.status("ns1", "feed").unwrap()
    }

    async fn next_catch_up(&mut self) -> CatchUpRequest {
        tokio::time::timeout(Duration::from_secs(10), self.catch_ups.recv()).await.expect("a catch-up").unwrap()
    }
}

fn patient(id: &str) -> Value {
    json!({"resourceType": "Patient", "id": id, "meta": {"lastUpdated": "2026-11-26T10:00:00Z"}, "active": true})
}

/// A Subscriptions Backport notification (R4, as Helios sends it), with its events' focus and entries.
fn backport(sub: &str, kind: &str, first_event: i64, focus: &[&str], entries: Vec<Value>) -> Value {
    let mut params = vec![
        json!({"name": "subscription", "valueReference": {"reference": format!("Subscription/{sub}")}}),
        json!({"name": "status", "valueCode": "active"}),
        json!({"name": "type", "valueCode": kind}),
        json!({"name": "events-since-subscription-start", "valueString": (first_event + focus.len() as i64 - 1).to_string()}),
    ];
    for (i, f) in focus.iter().enumerate() {
        params.push(json!({"name": "notification-event", "part": [
            {"name": "event-number", "valueString": (first_event + i as i64).to_string()},
            {"name": "timestamp", "valueInstant": "2026-11-26T10:00:00Z"},
            {"name": "focus", "valueReference": {"reference": f}}]}));
    }
    let mut entry =
        vec![json!({"fullUrl": "urn:uuid:status", "resource": {"resourceType": "Parameters", "parameter": params}})];
    entry.extend(entries);
    json!({"resourceType": "Bundle", "type": "history", "entry": entry})
}

#[tokio::test]
async fn classic_rest_hooks_write_and_delete_and_only_with_the_syncs_credential() {
    let h = Harness::start(None, PathlingConfig::default()).await;
    assert_eq!(h.send("PUT", "Patient/p1", &patient("p1"), &[]).await.0, 200);
    assert_eq!(h.pathling.ids("Patient"), vec!["p1"]);
    assert_eq!(h.send("DELETE", "Patient/p1", &Value::Null, &[]).await.0, 200);
    assert!(h.pathling.ids("Patient").is_empty());
    // a body that is not the resource the URL names, a path that is not Type/id
    assert_eq!(h.send("PUT", "Patient/p2", &patient("p3"), &[]).await.0, 400);
    assert_eq!(h.send("PUT", "Patient/a$b", &patient("a$b"), &[]).await.0, 400);

    // no credential, another sync's credential, a forged one: 401, nothing written
    let url = format!("{}/Patient/p9", h.url);
    let body = patient("p9").to_string();
    let other = h.relay.token("another-uid");
    for auth in [None, Some(format!("Bearer {other}")), Some("Bearer AAAA".to_string())] {
        let mut rb = h.http.put(&url).body(body.clone());
        if let Some(a) = auth {
            rb = rb.header("authorization", a);
        }
        assert_eq!(rb.send().await.unwrap().status().as_u16(), 401);
    }
    // an unknown sync: come back later (a new leader may not have configured it yet)
    let r = h.http.put(url.replace("/feed/", "/other/")).body(body).send().await.unwrap();
    assert_eq!((r.status().as_u16(), r.headers()["retry-after"].to_str().unwrap()), (503, "30"));
    assert!(h.pathling.ids("Patient").is_empty());
    let st = h.status();
    assert_eq!((st.received, st.applied, st.failed), (2, 2, 2), "{st:?}");
}

#[tokio::test]
async fn medplum_posts_resources_and_deletes_by_header() {
    let h = Harness::start(None, PathlingConfig::default()).await;
    assert_eq!(h.send("POST", "", &patient("m1"), &[]).await.0, 200);
    assert_eq!(h.pathling.ids("Patient"), vec!["m1"]);
    assert_eq!(h.send("POST", "", &json!({}), &[("x-medplum-deleted-resource", "Patient/m1")]).await.0, 200);
    assert!(h.pathling.ids("Patient").is_empty());
    assert_eq!(h.send("POST", "", &json!({}), &[("x-medplum-deleted-resource", "../../etc")]).await.0, 400);
}

#[tokio::test]
async fn topic_notifications_full_resource_and_id_only() {
    // R5: full-resource, SubscriptionStatus first; an entry without a resource is a delete
    let h = Harness::start(None, PathlingConfig::default()).await;
    h.pathling.insert("Observation", "gone", json!({"resourceType": "Observation", "id": "gone"}));
    let r5 = json!({"resourceType": "Bundle", "type": "subscription-notification", "entry": [
        {"resource": {"resourceType": "SubscriptionStatus", "status": "active", "type": "event-notification",
          "eventsSinceSubscriptionStart": "2", "subscription": {"reference": "https://s/fhir/Subscription/r5"},
          "notificationEvent": [{"eventNumber": "1", "focus": {"reference": "Observation/o1"}},
                                {"eventNumber": "2", "focus": {"reference": "Observation/gone"}}]}},
        {"fullUrl": "https://s/fhir/Observation/o1", "resource": {"resourceType": "Observation", "id": "o1", "status": "final"}},
        {"fullUrl": "https://s/fhir/Observation/gone", "request": {"method": "DELETE", "url": "Observation/gone"}}]});
    assert_eq!(h.send("POST", "", &r5, &[]).await.0, 200);
    assert_eq!(h.pathling.ids("Observation"), vec!["o1"]);
    assert_eq!(h.status().last_event_numbers.get("r5"), Some(&2));

    // R4 Backport, id-only as Helios sends it over http: each focus is read from the source;
    // one the source no longer has is deleted
    let h = Harness::start(None, PathlingConfig::default()).await;
    h.http.put(format!("{}/Patient/s1", h.source.base)).json(&patient("s1")).send().await.unwrap();
    h.pathling.insert("Patient", "s2", patient("s2"));
    let hs = backport("hb", "handshake", 0, &[], vec![]);
    assert_eq!(h.send("POST", "", &hs, &[]).await.0, 200);
    let n = backport(
        "hb",
        "event-notification",
        1,
        &["Patient/s1", "Patient/s2"],
        vec![
            json!({"fullUrl": "http://h/Patient/s1", "request": {"method": "GET", "url": "Patient/s1"}}),
            json!({"fullUrl": "http://h/Patient/s2", "request": {"method": "GET", "url": "Patient/s2"}}),
        ],
    );
    assert_eq!(h.send("POST", "", &n, &[]).await.0, 200);
    assert_eq!(h.pathling.ids("Patient"), vec!["s1"], "s1 read from the source, s2 gone there");
    let st = h.status();
    assert_eq!((st.heartbeats, st.applied, st.last_event_numbers.get("hb")), (1, 2, Some(&2)), "{st:?}");
}

#[tokio::test]
async fn gaps_and_unknowable_changes_ask_for_a_catch_up() {
    let mut h = Harness::start(Some("nightly"), PathlingConfig::default()).await;
    h.http.put(format!("{}/Patient/a", h.source.base)).json(&patient("a")).send().await.unwrap();
    let one = backport("g", "event-notification", 1, &["Patient/a"], vec![]);
    assert_eq!(h.send("POST", "", &one, &[]).await.0, 200);
    assert!(h.catch_ups.try_recv().is_err(), "no gap yet");
    // events 2..4 never arrived
    let five = backport("g", "event-notification", 5, &["Patient/a"], vec![]);
    assert_eq!(h.send("POST", "", &five, &[]).await.0, 200);
    let c = h.next_catch_up().await;
    assert_eq!((c.namespace.as_str(), c.from.as_str(), c.sync.as_str()), ("ns1", "feed", "nightly"));
    assert!(c.why.contains("2") && c.why.contains("4"), "{}", c.why);
    // a second gap within 30 s is recorded but does not ask again
    let nine = backport("g", "event-notification", 9, &["Patient/a"], vec![]);
    assert_eq!(h.send("POST", "", &nine, &[]).await.0, 200);
    assert!(h.catch_ups.try_recv().is_err(), "at most one catch-up per 30 s");
    let st = h.status();
    assert_eq!(st.catch_ups, 1);
    assert!(st.last_missed.unwrap().contains("8"));

    // empty content: the change cannot be known, only caught up
    let mut h = Harness::start(Some("nightly"), PathlingConfig::default()).await;
    let mut empty = backport("e", "event-notification", 1, &["Patient/a"], vec![]);
    // an empty notification names no focus
    empty["entry"][0]["resource"]["parameter"][4]["part"].as_array_mut().unwrap().truncate(2);
    assert_eq!(h.send("POST", "", &empty, &[]).await.0, 200);
    assert!(h.next_catch_up().await.why.contains("empty"));
}

#[tokio::test]
async fn concurrent_changes_are_group_committed() {
    // every write costs Pathling 200 ms, one at a time
    let h =
        Harness::start(None, PathlingConfig { write_delay: Some(Duration::from_millis(200)), ..Default::default() })
            .await;
    let h = Arc::new(h);
    let mut tasks = vec![];
    for i in 0..200 {
        let h = h.clone();
        tasks.push(tokio::spawn(async move {
            h.send("PUT", &format!("Patient/p{i}"), &patient(&format!("p{i}")), &[]).await.0
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    assert_eq!(h.pathling.ids("Patient").len(), 200);
    let log = h.pathling.log();
    assert!(log.writes <= 10, "200 changes in {} writes", log.writes);
    assert_eq!(log.puts.len(), 200, "each change written once");
    assert!(log.batches >= 1 && log.batch_entries >= 150, "{} batches of {} entries", log.batches, log.batch_entries);
    let st = h.status();
    assert_eq!((st.applied, st.writes as u32), (200, log.writes));
}

#[tokio::test]
async fn pathling_down_asks_sources_to_come_back_then_catches_up() {
    let mut h =
        Harness::start(Some("nightly"), PathlingConfig { writes_forever: Some(503), ..Default::default() }).await;
    let (status, retry) = h.send("PUT", "Patient/d1", &patient("d1"), &[]).await;
    assert_eq!((status, retry.as_deref()), (503, Some("10")));
    let tries = h.pathling.log().writes;
    assert!((2..=12).contains(&tries), "a bounded retry, {tries} writes");
    assert!(h.catch_ups.try_recv().is_err(), "the source keeps the change: no catch-up yet");
    h.pathling.configure(|c| c.writes_forever = None);
    assert_eq!(h.send("PUT", "Patient/d1", &patient("d1"), &[]).await.0, 200);
    assert_eq!(h.pathling.ids("Patient"), vec!["d1"]);
    // sources may have given up on other changes meanwhile
    assert!(h.next_catch_up().await.why.contains("was unavailable"));
}

#[tokio::test]
async fn a_change_pathling_refuses_does_not_hold_up_the_others() {
    let mut h = Harness::start(
        Some("nightly"),
        PathlingConfig {
            write_delay: Some(Duration::from_millis(300)),
            reject_ids: vec!["bad".into()],
            ..Default::default()
        },
    )
    .await;
    // the first write holds Pathling; the next three queue and go in one batch, which Pathling refuses
    let mut catch_ups = std::mem::replace(&mut h.catch_ups, tokio::sync::mpsc::unbounded_channel().1);
    let h = Arc::new(h);
    let first = {
        let h = h.clone();
        tokio::spawn(async move { h.send("PUT", "Patient/first", &patient("first"), &[]).await.0 })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut rest = vec![];
    for id in ["good1", "bad", "good2"] {
        let h = h.clone();
        rest.push((
            id,
            tokio::spawn(async move { h.send("PUT", &format!("Patient/{id}"), &patient(id), &[]).await.0 }),
        ));
    }
    assert_eq!(first.await.unwrap(), 200);
    for (id, t) in rest {
        assert_eq!(t.await.unwrap(), if id == "bad" { 422 } else { 200 }, "{id}");
    }
    assert_eq!(h.pathling.ids("Patient"), vec!["first", "good1", "good2"]);
    assert_eq!(h.status().failed, 1);
    let c = tokio::time::timeout(Duration::from_secs(5), catch_ups.recv()).await.unwrap().unwrap();
    assert!(c.why.contains("refused"), "{}", c.why);
}

#[tokio::test]
async fn the_relay_holds_a_bounded_amount() {
    // Pathling slow: notifications wait in the relay; past 32 MiB sources are told to come back
    let h = Arc::new(
        Harness::start(None, PathlingConfig { write_delay: Some(Duration::from_millis(1500)), ..Default::default() })
            .await,
    );
    let big = |id: &str| json!({"resourceType": "Patient", "id": id, "text": {"div": "x".repeat(6 << 20)}});
    let mut tasks = vec![];
    for i in 0..8 {
        let (h, body) = (h.clone(), big(&format!("b{i}")));
        tasks.push(tokio::spawn(async move { h.send("PUT", &format!("Patient/b{i}"), &body, &[]).await }));
    }
    let mut answers = vec![];
    for t in tasks {
        answers.push(t.await.unwrap());
    }
    let refused = answers.iter().filter(|a| a.0 == 503).count();
    assert!(refused >= 1, "{answers:?}");
    assert!(answers.iter().all(|a| a.0 == 200 || (a.0 == 503 && a.1.as_deref() == Some("5"))), "{answers:?}");
    assert_eq!(h.pathling.ids("Patient").len(), 8 - refused);
}

#[tokio::test]
async fn a_replica_that_does_not_relay_forwards_to_the_one_that_does() {
    let h = Harness::start(None, PathlingConfig::default()).await;
    let leader_addr = h.url.trim_start_matches("http://").split('/').next().unwrap().to_string();
    let (other, _rx) = Relay::new(b"a shared secret", Arc::new(Metrics::default()), CancellationToken::new());
    let follower = Arc::new(Leadership::elected());
    let addr = serve(other, follower.clone()).await;
    let url = format!("http://{addr}/fss/ns1/feed/Patient/f1");
    let put = || h.http.put(&url).bearer_auth(&h.token).body(patient("f1").to_string());
    // nobody is known to hold the lease: come back soon
    let r = put().send().await.unwrap();
    assert_eq!((r.status().as_u16(), r.headers()["retry-after"].to_str().unwrap()), (503, "2"));
    follower.observe(false, Some(format!("fhirsync-0@{leader_addr}")));
    assert_eq!(put().send().await.unwrap().status().as_u16(), 200);
    assert_eq!(h.pathling.ids("Patient"), vec!["f1"]);
    // the leader checks the credential, whoever forwarded it
    let r = h.http.put(&url).bearer_auth("forged").body(patient("f1").to_string()).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 401);
}

#[tokio::test]
async fn a_change_the_source_cannot_give_is_not_acknowledged() {
    let mut h = Harness::start(Some("nightly"), PathlingConfig::default()).await;
    h.http.put(format!("{}/Patient/ok", h.source.base)).json(&patient("ok")).send().await.unwrap();
    // the source answers a read of Patient/odd with another resource
    h.http.put(format!("{}/Patient/odd", h.source.base)).json(&patient("other")).send().await.unwrap();
    let n = backport("u", "event-notification", 1, &["Patient/ok", "Patient/odd"], vec![]);
    assert_eq!(h.send("POST", "", &n, &[]).await.0, 422, "not a 200 for a change never applied");
    assert_eq!(h.pathling.ids("Patient"), vec!["ok"], "the other change is applied");
    assert!(h.next_catch_up().await.why.contains("Patient/odd"));
}

#[tokio::test]
async fn an_older_version_arriving_late_does_not_overwrite_a_newer_one() {
    let h = Harness::start(None, PathlingConfig::default()).await;
    let version = |when: &str, family: &str| json!({"resourceType": "Patient", "id": "v", "meta": {"lastUpdated": when}, "name": [{"family": family}]});
    assert_eq!(h.send("PUT", "Patient/v", &version("2026-11-26T10:00:02Z", "new"), &[]).await.0, 200);
    // a retried delivery of the version before it
    assert_eq!(h.send("PUT", "Patient/v", &version("2026-11-26T10:00:01Z", "old"), &[]).await.0, 200);
    let writes = h.pathling.log().writes;
    assert_eq!(writes, 1, "the older version is not written");
    assert_eq!(h.send("PUT", "Patient/v", &version("2026-11-26T10:00:03Z", "newer"), &[]).await.0, 200);
    assert_eq!(h.pathling.log().writes, 2);
}

#[tokio::test]
async fn a_late_older_version_does_not_bring_back_a_deleted_resource() {
    let h = Harness::start(None, PathlingConfig::default()).await;
    let version = |when: &str, family: &str| json!({"resourceType": "Patient", "id": "d", "meta": {"lastUpdated": when}, "name": [{"family": family}]});
    assert_eq!(h.send("PUT", "Patient/d", &version("2026-11-26T10:00:02Z", "v2"), &[]).await.0, 200);
    assert_eq!(h.send("DELETE", "Patient/d", &Value::Null, &[]).await.0, 200);
    assert!(h.pathling.ids("Patient").is_empty(), "the delete is applied");
    // a retried delivery of v1 arrives after the delete, and one of v2 too
    assert_eq!(h.send("PUT", "Patient/d", &version("2026-11-26T10:00:01Z", "v1"), &[]).await.0, 200);
    assert_eq!(h.send("PUT", "Patient/d", &version("2026-11-26T10:00:02Z", "v2"), &[]).await.0, 200);
    assert!(h.pathling.ids("Patient").is_empty(), "a version the delete followed does not bring the resource back");
    // a newer version is a re-creation at the source: it is written
    assert_eq!(h.send("PUT", "Patient/d", &version("2026-11-26T10:00:05Z", "v3"), &[]).await.0, 200);
    assert_eq!(h.pathling.ids("Patient"), vec!["d"]);
}

/// Opens a connection that sends the start of a request and then a byte every `every`, never
/// finishing its headers (up to `bytes`); returns when the server closes it, with how long that took.
async fn slow_sender(addr: &str, bytes: usize, every: Duration) -> Duration {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let t = std::time::Instant::now();
    let Ok(mut c) = tokio::net::TcpStream::connect(addr).await else { return t.elapsed() };
    if c.write_all(b"POST /fss/ns1/feed HTTP/1.1\r\nHost: x\r\nX-Padding: ").await.is_err() {
        return t.elapsed();
    }
    let mut sent = 0;
    let mut buf = [0u8; 512];
    while sent < bytes {
        tokio::select! {
            r = c.read(&mut buf) => if matches!(r, Ok(0) | Err(_)) { return t.elapsed() } else { continue },
            _ = tokio::time::sleep(every) => {}
        }
        let piece = vec![b'a'; 1024.min(bytes - sent)];
        if c.write_all(&piece).await.is_err() {
            return t.elapsed();
        }
        sent += piece.len();
    }
    t.elapsed()
}

/// Connections the server on `port` has accepted and holds open (each a descriptor of this process):
/// established sockets whose local port is `port` and that have an inode — the ones still in the
/// kernel's backlog have none.
fn accepted_connections(port: u16) -> usize {
    let tcp = std::fs::read_to_string("/proc/self/net/tcp").unwrap_or_default();
    tcp.lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 9
                && f[1].rsplit(':').next().and_then(|p| u16::from_str_radix(p, 16).ok()) == Some(port)
                && f[3] == "01"
                && f[9] != "0"
        })
        .count()
}

#[tokio::test]
async fn a_thousand_slow_senders_hold_bounded_connections_and_real_changes_still_arrive() {
    let h = Harness::start(None, PathlingConfig::default()).await;
    let addr = h.url.trim_start_matches("http://").split('/').next().unwrap().to_string();
    let port: u16 = addr.rsplit(':').next().unwrap().parse().unwrap();
    // 256 KiB of headers each, in 1 KiB pieces every 30 ms: about 8 s to send, never finished
    let slow: Vec<_> = (0..1000)
        .map(|_| {
            let a = addr.clone();
            tokio::spawn(async move { slow_sender(&a, 256 << 10, Duration::from_millis(30)).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await; // let the flood build up
    let held = accepted_connections(port);
    assert!(
        held > 0 && held <= fhirsync::serve::Limits::RECEIVER.connections,
        "the receiver holds {held} connections of the 1,000"
    );
    // a real notification gets through the flood
    let t = std::time::Instant::now();
    let (status, _) =
        tokio::time::timeout(Duration::from_secs(20), h.send("PUT", "Patient/real", &patient("real"), &[]))
            .await
            .expect("a real change is answered during the flood");
    assert_eq!(status, 200, "after {:?}", t.elapsed());
    assert_eq!(h.pathling.ids("Patient"), vec!["real"]);
    // every slow sender is cut off long before it would have finished its headers
    for s in slow {
        let took = s.await.unwrap();
        assert!(took < Duration::from_secs(8), "a slow sender was held for {took:?}");
    }
}

#[tokio::test]
async fn a_replica_that_forwards_refuses_a_request_without_a_credential_before_reading_its_body() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let h = Harness::start(None, PathlingConfig::default()).await;
    let leader_addr = h.url.trim_start_matches("http://").split('/').next().unwrap().to_string();
    let (other, _rx) = Relay::new(b"a shared secret", Arc::new(Metrics::default()), CancellationToken::new());
    let follower = Arc::new(Leadership::elected());
    follower.observe(false, Some(format!("fhirsync-0@{leader_addr}")));
    let addr = serve(other, follower).await;
    // 40 requests that declare 1 MiB bodies they never send, with no credential or a forged one
    let floods: Vec<_> = (0..40)
        .map(|i| {
            let a = addr.clone();
            tokio::spawn(async move {
                let mut c = tokio::net::TcpStream::connect(&a).await.unwrap();
                let auth =
                    if i % 2 == 0 { String::new() } else { "Authorization: Bearer 00000000-0000.forged\r\n".into() };
                let head = format!("POST /fss/ns1/feed HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 1048576\r\n\r\n");
                c.write_all(head.as_bytes()).await.unwrap();
                let mut buf = [0u8; 64];
                let n = tokio::time::timeout(Duration::from_secs(2), c.read(&mut buf))
                    .await
                    .expect("answered at once")
                    .unwrap();
                String::from_utf8_lossy(&buf[..n]).to_string()
            })
        })
        .collect();
    for f in floods {
        let head = f.await.unwrap();
        assert!(head.starts_with("HTTP/1.1 401"), "{head}");
    }
    // meanwhile a real change through the same replica reaches Pathling
    let url = format!("http://{addr}/fss/ns1/feed/Patient/through");
    let r = h.http.put(&url).bearer_auth(&h.token).body(patient("through").to_string()).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(h.pathling.ids("Patient"), vec!["through"]);
}
