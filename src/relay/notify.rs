//! What a source's notification says, whatever kind of source sent it: a classic R4 rest-hook
//! `PUT`/`DELETE {Type}/{id}` (HAPI, Smile CDR, Firely), Medplum's `POST` of the resource (and of `{}`
//! with `X-Medplum-Deleted-Resource` for a delete), or a topic-based notification Bundle (R4
//! Subscriptions Backport with a `Parameters` status, R4B/R5 with a `SubscriptionStatus`): handshake,
//! heartbeat or event-notification with `full-resource`, `id-only` or `empty` content. Pure functions:
//! every byte is from outside and is checked here (types and ids by FHIR's grammar, sizes bounded by
//! the receiver), and nothing is applied.

use jiff::Timestamp;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::fhir::bundle::BoundedVec;
use crate::fhir::ids::{self, ResourceHead};

/// Most entries read from one notification Bundle.
pub const MAX_ENTRIES: usize = 1000;
/// Most events read from one status.
const MAX_EVENTS: usize = 1000;

/// One change to bring into Pathling.
#[derive(Debug, Clone)]
pub enum Change {
    /// Write this resource (raw JSON, its type and id checked).
    Upsert { type_: String, id: String, resource: Box<RawValue>, changed_at: Option<Timestamp> },
    /// Remove this resource.
    Delete { type_: String, id: String },
    /// Read this resource from the source: present means upsert, 404/410 means delete (`id-only`).
    Read { type_: String, id: String },
}

impl Change {
    /// `Type/id`.
    pub fn key(&self) -> (&str, &str) {
        match self {
            Change::Upsert { type_, id, .. } | Change::Delete { type_, id } | Change::Read { type_, id } => (type_, id),
        }
    }
}

// RawValue has no PartialEq: changes compare by their text
impl PartialEq for Change {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (
                Change::Upsert { type_: a, id: b, resource: c, changed_at: d },
                Change::Upsert { type_: w, id: x, resource: y, changed_at: z },
            ) => a == w && b == x && c.get() == y.get() && d == z,
            (Change::Delete { type_: a, id: b }, Change::Delete { type_: w, id: x })
            | (Change::Read { type_: a, id: b }, Change::Read { type_: w, id: x }) => a == w && b == x,
            _ => false,
        }
    }
}

/// The payload content of a topic-based Subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Content {
    #[default]
    IdOnly,
    FullResource,
    Empty,
}

impl Content {
    /// The code in Subscriptions.
    pub fn code(self) -> &'static str {
        match self {
            Content::IdOnly => "id-only",
            Content::FullResource => "full-resource",
            Content::Empty => "empty",
        }
    }
}

/// The kind of a topic-based notification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Handshake,
    Heartbeat,
    Event,
    QueryStatus,
    Other,
}

/// One event of a topic-based notification.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Event {
    pub number: Option<i64>,
    pub timestamp: Option<Timestamp>,
    /// The focus `Type/id`, when it is one.
    pub focus: Option<(String, String)>,
}

/// A topic-based notification, read.
#[derive(Debug, Clone, PartialEq)]
pub struct TopicNotification {
    /// The Subscription's id at the source (from `Subscription/{id}` or an absolute reference).
    pub subscription: Option<String>,
    pub kind: Kind,
    /// The Subscription's status as the source sees it (`active`, `error`, …).
    pub status: Option<String>,
    pub events_since_start: Option<i64>,
    pub events: Vec<Event>,
    /// What to bring into Pathling.
    pub changes: Vec<Change>,
    /// Events whose change cannot be known from the notification (`empty` content).
    pub unknowable: usize,
}

/// What a request to the receiver means.
#[derive(Debug, Clone, PartialEq)]
pub enum Notification {
    /// One change (classic rest-hook, Medplum).
    Change(Change),
    /// A topic-based notification Bundle.
    Topic(TopicNotification),
}

/// Why a request is not a notification fhirsync understands (answered 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct NotUnderstood(pub String);

fn bad(m: impl Into<String>) -> NotUnderstood {
    NotUnderstood(m.into())
}

/// Checks a resource body: its type and id, and returns it as a change.
fn upsert(body: &[u8], want: Option<(&str, &str)>) -> Result<Change, NotUnderstood> {
    let raw: Box<RawValue> =
        serde_json::from_slice(body).map_err(|e| bad(format!("the body is not a JSON resource: {e}")))?;
    let h: ResourceHead =
        serde_json::from_str(raw.get()).map_err(|e| bad(format!("the body is not a resource: {e}")))?;
    let (Some(t), Some(id)) = (h.resource_type, h.id) else {
        return Err(bad("the resource has no resourceType or id"));
    };
    if !ids::is_type(&t) || !ids::is_id(&id) {
        return Err(bad("the resource's type or id is not valid FHIR"));
    }
    if let Some((wt, wid)) = want
        && (wt != t || wid != id)
    {
        return Err(bad(format!("the body is {t}/{id}, the URL says {wt}/{wid}")));
    }
    let changed_at = h.meta.and_then(|m| m.last_updated).and_then(|l| l.parse().ok());
    Ok(Change::Upsert { type_: t, id, resource: raw, changed_at })
}

/// A classic rest-hook delivery to `{endpoint}/{Type}/{id}`.
pub fn rest_hook(method: &str, type_: &str, id: &str, body: &[u8]) -> Result<Notification, NotUnderstood> {
    if !ids::is_type(type_) || !ids::is_id(id) {
        return Err(bad("the path is not {Type}/{id}"));
    }
    match method {
        "PUT" | "POST" => upsert(body, Some((type_, id))).map(Notification::Change),
        "DELETE" => Ok(Notification::Change(Change::Delete { type_: type_.into(), id: id.into() })),
        m => Err(bad(format!("{m} is not a notification"))),
    }
}

#[derive(Deserialize)]
struct RawBundle {
    #[serde(rename = "resourceType", default)]
    resource_type: Option<String>,
    #[serde(rename = "type", default)]
    type_: Option<String>,
    #[serde(default)]
    entry: BoundedVec<RawEntry, MAX_ENTRIES>,
}

#[derive(Deserialize)]
struct RawEntry {
    #[serde(rename = "fullUrl", default)]
    full_url: Option<String>,
    #[serde(default)]
    resource: Option<Box<RawValue>>,
    #[serde(default)]
    request: Option<RawRequest>,
}

#[derive(Deserialize)]
struct RawRequest {
    #[serde(default)]
    method: Option<String>,
    #[serde(default)]
    url: Option<String>,
}

/// `Parameters` (R4 Backport) status.
#[derive(Deserialize)]
struct Params {
    #[serde(default)]
    parameter: BoundedVec<Param, MAX_EVENTS>,
}

#[derive(Deserialize)]
struct Param {
    #[serde(default)]
    name: String,
    #[serde(rename = "valueReference", default)]
    value_reference: Option<Reference>,
    #[serde(rename = "valueCode", default)]
    value_code: Option<String>,
    #[serde(rename = "valueString", default)]
    value_string: Option<String>,
    #[serde(rename = "valueInteger64", default)]
    value_integer64: Num,
    #[serde(rename = "valueUnsignedInt", default)]
    value_unsigned: Num,
    #[serde(default)]
    part: BoundedVec<Part, 16>,
}

/// A part of a `notification-event` parameter (parts do not nest: what a source nests is skipped).
#[derive(Deserialize)]
struct Part {
    #[serde(default)]
    name: String,
    #[serde(rename = "valueReference", default)]
    value_reference: Option<Reference>,
    #[serde(rename = "valueString", default)]
    value_string: Option<String>,
    #[serde(rename = "valueInteger64", default)]
    value_integer64: Num,
    #[serde(rename = "valueUnsignedInt", default)]
    value_unsigned: Num,
    #[serde(rename = "valueInstant", default)]
    value_instant: Option<String>,
}

#[derive(Deserialize)]
struct Reference {
    #[serde(default)]
    reference: Option<String>,
}

/// `SubscriptionStatus` (R4B/R5).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SubscriptionStatus {
    #[serde(default)]
    status: Option<String>,
    #[serde(rename = "type", default)]
    type_: Option<String>,
    #[serde(default)]
    events_since_subscription_start: Num,
    #[serde(default)]
    notification_event: BoundedVec<R5Event, MAX_EVENTS>,
    #[serde(default)]
    subscription: Option<Reference>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct R5Event {
    #[serde(default)]
    event_number: Num,
    #[serde(default)]
    timestamp: Option<String>,
    #[serde(default)]
    focus: Option<Reference>,
}

/// Largest event number taken (JSON's safe integers): a larger one is as good as none.
const NUMBER_MAX: i64 = 1 << 53;

/// An event count sent as a JSON number or a string (`"12"`; R4 uses valueString, R5 integer64
/// strings), from 0 to 2^53; anything else reads as none, skipped without being built.
#[derive(Default, Clone, Copy)]
struct Num(Option<i64>);

fn count(s: &str) -> Option<i64> {
    s.trim().parse().ok().filter(|n| (0..=NUMBER_MAX).contains(n))
}

impl<'de> Deserialize<'de> for Num {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::{IgnoredAny, MapAccess, SeqAccess, Visitor};
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Num;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a number")
            }
            fn visit_i64<E>(self, v: i64) -> Result<Num, E> {
                Ok(Num(Some(v).filter(|n| (0..=NUMBER_MAX).contains(n))))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Num, E> {
                Ok(Num(i64::try_from(v).ok().filter(|n| *n <= NUMBER_MAX)))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Num, E> {
                Ok(Num(None))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Num, E> {
                Ok(Num(None))
            }
            fn visit_unit<E>(self) -> Result<Num, E> {
                Ok(Num(None))
            }
            fn visit_str<E>(self, v: &str) -> Result<Num, E> {
                Ok(Num(count(v)))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<Num, A::Error> {
                while a.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Num(None))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Num, A::Error> {
                while a.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Num(None))
            }
        }
        d.deserialize_any(V)
    }
}

fn kind(code: Option<&str>) -> Kind {
    match code {
        Some("handshake") => Kind::Handshake,
        Some("heartbeat") => Kind::Heartbeat,
        Some("event-notification") => Kind::Event,
        Some("query-status") | Some("query-event") => Kind::QueryStatus,
        _ => Kind::Other,
    }
}

/// The id of a `Subscription/{id}` reference (relative or absolute).
fn subscription_id(r: Option<&str>) -> Option<String> {
    ids::reference(r?).filter(|(t, _)| t == "Subscription").map(|(_, id)| id)
}

/// A topic-based notification Bundle, whatever content the Subscription asked for: a resource in an
/// entry is written, an entry with a `DELETE` request deletes, anything else named (an `id-only`
/// entry, an entry left without its resource, an event's focus) is read from the source.
pub fn topic(body: &[u8]) -> Result<Notification, NotUnderstood> {
    let b: RawBundle = serde_json::from_slice(body).map_err(|e| bad(format!("not a notification Bundle: {e}")))?;
    if b.resource_type.as_deref() != Some("Bundle") {
        return Err(bad("not a Bundle"));
    }
    if !matches!(b.type_.as_deref(), Some("history") | Some("subscription-notification")) {
        return Err(bad("a Bundle that is not a subscription notification"));
    }
    let mut entries = b.entry.0.into_iter();
    let first = entries.next().and_then(|e| e.resource).ok_or_else(|| bad("the notification has no status entry"))?;
    let head: ResourceHead = serde_json::from_str(first.get()).map_err(|e| bad(e.to_string()))?;
    let mut n = TopicNotification {
        subscription: None,
        kind: Kind::Other,
        status: None,
        events_since_start: None,
        events: vec![],
        changes: vec![],
        unknowable: 0,
    };
    match head.resource_type.as_deref() {
        Some("Parameters") => {
            let p: Params = serde_json::from_str(first.get()).map_err(|e| bad(e.to_string()))?;
            for x in p.parameter.0 {
                match x.name.as_str() {
                    "subscription" => {
                        n.subscription = subscription_id(x.value_reference.and_then(|r| r.reference).as_deref())
                    }
                    "type" => n.kind = kind(x.value_code.as_deref()),
                    "status" => n.status = x.value_code.map(|s| crate::text::peer_text(&s, 32)),
                    "events-since-subscription-start" => {
                        n.events_since_start =
                            x.value_string.as_deref().and_then(count).or(x.value_integer64.0).or(x.value_unsigned.0)
                    }
                    "notification-event" => {
                        let mut e = Event::default();
                        for part in x.part.0 {
                            match part.name.as_str() {
                                "event-number" => {
                                    e.number = part
                                        .value_string
                                        .as_deref()
                                        .and_then(count)
                                        .or(part.value_integer64.0)
                                        .or(part.value_unsigned.0)
                                }
                                "timestamp" => e.timestamp = part.value_instant.and_then(|t| t.parse().ok()),
                                "focus" => {
                                    e.focus =
                                        part.value_reference.and_then(|r| r.reference).and_then(|r| ids::reference(&r))
                                }
                                _ => {}
                            }
                        }
                        n.events.push(e);
                    }
                    _ => {}
                }
            }
        }
        Some("SubscriptionStatus") => {
            let s: SubscriptionStatus = serde_json::from_str(first.get()).map_err(|e| bad(e.to_string()))?;
            n.subscription = subscription_id(s.subscription.and_then(|r| r.reference).as_deref());
            n.kind = kind(s.type_.as_deref());
            n.status = s.status.map(|s| crate::text::peer_text(&s, 32));
            n.events_since_start = s.events_since_subscription_start.0;
            n.events = s
                .notification_event
                .0
                .into_iter()
                .map(|e| Event {
                    number: e.event_number.0,
                    timestamp: e.timestamp.and_then(|t| t.parse().ok()),
                    focus: e.focus.and_then(|r| r.reference).and_then(|r| ids::reference(&r)),
                })
                .collect();
        }
        _ => return Err(bad("the notification's first entry is neither Parameters nor SubscriptionStatus")),
    }
    match n.kind {
        Kind::Event => {}
        Kind::Other => {
            return Err(bad("a notification of no known type (handshake, heartbeat, event-notification, …)"));
        }
        _ => return Ok(Notification::Topic(n)),
    }
    let when =
        |focus: &(String, String)| n.events.iter().find(|e| e.focus.as_ref() == Some(focus)).and_then(|e| e.timestamp);
    let mut changes = vec![];
    for e in entries {
        match e.resource {
            Some(r) => {
                let mut c = upsert(r.get().as_bytes(), None)?;
                if let Change::Upsert { type_, id, changed_at, .. } = &mut c
                    && changed_at.is_none()
                {
                    *changed_at = when(&(type_.clone(), id.clone()));
                }
                changes.push(c);
            }
            None => {
                let target = e
                    .request
                    .as_ref()
                    .and_then(|r| r.url.as_deref())
                    .and_then(ids::reference)
                    .or_else(|| e.full_url.as_deref().and_then(ids::reference));
                let Some((type_, id)) = target else {
                    n.unknowable += 1;
                    continue;
                };
                let deleted = e
                    .request
                    .as_ref()
                    .and_then(|r| r.method.as_deref())
                    .is_some_and(|m| m.eq_ignore_ascii_case("DELETE"));
                // without its resource (left out, or withheld from fhirsync) an entry is read back:
                // only the source can say it is gone
                changes.push(if deleted { Change::Delete { type_, id } } else { Change::Read { type_, id } });
            }
        }
    }
    // events the entries do not cover: their focus is read (Helios names it even without entries);
    // events without one cannot be known
    let covered: std::collections::HashSet<(String, String)> =
        changes.iter().map(|c| (c.key().0.to_string(), c.key().1.to_string())).collect();
    let mut unfocused = 0usize;
    for e in &n.events {
        match &e.focus {
            Some(k) if !covered.contains(k) && !changes.iter().any(|c| c.key() == (k.0.as_str(), k.1.as_str())) => {
                changes.push(Change::Read { type_: k.0.clone(), id: k.1.clone() });
            }
            Some(_) => {}
            None => unfocused += 1,
        }
    }
    let unmatched = covered.iter().filter(|k| !n.events.iter().any(|e| e.focus.as_ref() == Some(*k))).count();
    n.unknowable += unfocused.saturating_sub(unmatched);
    if n.events.is_empty() && changes.is_empty() {
        n.unknowable = n.unknowable.max(1);
    }
    n.changes = changes;
    Ok(Notification::Topic(n))
}

/// Medplum: a `POST` of the resource, or of `{}` with `X-Medplum-Deleted-Resource: Type/id`.
pub fn medplum(deleted: Option<&str>, body: &[u8]) -> Result<Notification, NotUnderstood> {
    match deleted {
        Some(r) => {
            let (type_, id) = ids::reference(r).ok_or_else(|| bad("X-Medplum-Deleted-Resource is not Type/id"))?;
            Ok(Notification::Change(Change::Delete { type_, id }))
        }
        None => upsert(body, None).map(Notification::Change),
    }
}

/// A `POST` to the endpoint: a notification Bundle, else a resource (Medplum and others).
pub fn post(body: &[u8], medplum_deleted: Option<&str>) -> Result<Notification, NotUnderstood> {
    if medplum_deleted.is_some() {
        return medplum(medplum_deleted, body);
    }
    let h: ResourceHead = serde_json::from_slice(body).map_err(|e| bad(format!("the body is not JSON: {e}")))?;
    match h.resource_type.as_deref() {
        Some("Bundle") => topic(body),
        Some(_) => medplum(None, body),
        None => Err(bad("the body is not a FHIR resource")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backport(kind: &str, extra: &str, entries: &str) -> String {
        format!(
            r#"{{"resourceType":"Bundle","type":"history","entry":[{{"fullUrl":"urn:uuid:1","resource":{{"resourceType":"Parameters","parameter":[
              {{"name":"subscription","valueReference":{{"reference":"Subscription/sub-1"}}}},
              {{"name":"topic","valueCanonical":"http://example.org/topic"}},
              {{"name":"status","valueCode":"active"}},
              {{"name":"type","valueCode":"{kind}"}},
              {{"name":"events-since-subscription-start","valueString":"7"}}{extra}]}}}}{entries}]}}"#
        )
    }

    fn event(n: i64, focus: &str) -> String {
        format!(
            r#",{{"name":"notification-event","part":[{{"name":"event-number","valueString":"{n}"}},{{"name":"timestamp","valueInstant":"2026-11-26T11:52:38.349289455+00:00"}},{{"name":"focus","valueReference":{{"reference":"{focus}"}}}}]}}"#
        )
    }

    fn topic_of(n: Notification) -> TopicNotification {
        match n {
            Notification::Topic(t) => t,
            other => panic!("{other:?}"),
        }
    }

    fn keys(changes: &[Change]) -> Vec<String> {
        changes
            .iter()
            .map(|c| match c {
                Change::Upsert { type_, id, .. } => format!("upsert {type_}/{id}"),
                Change::Delete { type_, id } => format!("delete {type_}/{id}"),
                Change::Read { type_, id } => format!("read {type_}/{id}"),
            })
            .collect()
    }

    #[test]
    fn backport_notifications_as_helios_sends_them() {
        let hs = topic_of(topic(backport("handshake", "", "").as_bytes()).unwrap());
        assert_eq!(
            (hs.kind, hs.subscription.as_deref(), hs.events_since_start),
            (Kind::Handshake, Some("sub-1"), Some(7))
        );
        // id-only: the entry names the resource; it is read from the source
        let idonly = backport(
            "event-notification",
            &event(8, "Patient/s1"),
            r#",{"fullUrl":"http://h/Patient/s1","request":{"method":"GET","url":"Patient/s1"},"response":{"status":"200"}}"#,
        );
        let t = topic_of(topic(idonly.as_bytes()).unwrap());
        assert_eq!(t.events[0].number, Some(8));
        assert_eq!(t.events[0].focus, Some(("Patient".into(), "s1".into())));
        assert_eq!(keys(&t.changes), vec!["read Patient/s1"]);
        // full-resource: the resource is used; an entry without one is a delete
        let full = backport(
            "event-notification",
            &format!("{}{}", event(9, "Patient/s1"), event(10, "Patient/s2")),
            r#",{"fullUrl":"http://h/Patient/s1","resource":{"resourceType":"Patient","id":"s1","active":true},"request":{"method":"PUT","url":"Patient/s1"}},
               {"fullUrl":"http://h/Patient/s2","request":{"method":"GET","url":"Patient/s2"}}"#,
        );
        let t = topic_of(topic(full.as_bytes()).unwrap());
        assert_eq!(keys(&t.changes), vec!["upsert Patient/s1", "read Patient/s2"], "only the source says it is gone");
        match &t.changes[0] {
            Change::Upsert { changed_at, resource, .. } => {
                assert!(changed_at.is_some(), "the event's timestamp dates the change");
                assert!(resource.get().contains("\"active\":true"));
            }
            c => panic!("{c:?}"),
        }
        // empty: a named focus is read; without one the change is unknowable
        let empty = backport("event-notification", &event(11, "Patient/s1"), "");
        let t = topic_of(topic(empty.as_bytes()).unwrap());
        assert_eq!((keys(&t.changes), t.unknowable), (vec!["read Patient/s1".to_string()], 0));
        let unfocused = r#",{"name":"notification-event","part":[{"name":"event-number","valueString":"12"}]}"#;
        let t = topic_of(topic(backport("event-notification", unfocused, "").as_bytes()).unwrap());
        assert_eq!((t.changes.len(), t.unknowable, t.events[0].number), (0, 1, Some(12)));
        // an entry that names nothing is unknowable too, not skipped
        let nameless = backport("event-notification", &event(13, "Patient/s1"), r#",{"request":{"method":"PUT"}}"#);
        let t = topic_of(topic(nameless.as_bytes()).unwrap());
        assert_eq!((keys(&t.changes), t.unknowable), (vec!["read Patient/s1".to_string()], 1));
    }

    #[test]
    fn r5_subscription_status_notifications() {
        let body = r#"{"resourceType":"Bundle","type":"subscription-notification","entry":[
          {"resource":{"resourceType":"SubscriptionStatus","status":"active","type":"event-notification",
            "eventsSinceSubscriptionStart":"3","subscription":{"reference":"https://s/fhir/Subscription/abc"},
            "notificationEvent":[{"eventNumber":"3","timestamp":"2026-11-26T00:00:00Z","focus":{"reference":"Observation/o1"}}]}},
          {"fullUrl":"https://s/fhir/Observation/o1","resource":{"resourceType":"Observation","id":"o1","status":"final"}}]}"#;
        let t = topic_of(post(body.as_bytes(), None).unwrap());
        assert_eq!((t.subscription.as_deref(), t.events_since_start, t.kind), (Some("abc"), Some(3), Kind::Event));
        assert_eq!(keys(&t.changes), vec!["upsert Observation/o1"]);
    }

    #[test]
    fn classic_and_medplum_deliveries() {
        let ok = rest_hook("PUT", "Patient", "p1", br#"{"resourceType":"Patient","id":"p1"}"#).unwrap();
        assert!(matches!(ok, Notification::Change(Change::Upsert { .. })));
        assert_eq!(
            rest_hook("DELETE", "Patient", "p1", b"").unwrap(),
            Notification::Change(Change::Delete { type_: "Patient".into(), id: "p1".into() })
        );
        let m = post(br#"{"resourceType":"Patient","id":"m1","meta":{"lastUpdated":"2026-11-26T00:00:00Z"}}"#, None);
        assert!(matches!(m, Ok(Notification::Change(Change::Upsert { changed_at: Some(_), .. }))));
        assert_eq!(
            post(b"{}", Some("Patient/m1")).unwrap(),
            Notification::Change(Change::Delete { type_: "Patient".into(), id: "m1".into() })
        );
    }

    #[test]
    fn numbers_and_nesting_a_source_cannot_abuse() {
        // event numbers past 2^53, negative, or not numbers read as none; nested parts are skipped
        let odd = r#",{"name":"notification-event","part":[{"name":"event-number","valueInteger64":[[[[1]]]]},
            {"name":"x","part":[{"name":"y","part":[{"name":"z"}]}]}]},
            {"name":"notification-event","part":[{"name":"event-number","valueString":"9223372036854775807"}]},
            {"name":"notification-event","part":[{"name":"event-number","valueInteger64":-4}]},
            {"name":"notification-event","part":[{"name":"event-number","valueInteger64":"5"}]}"#;
        let t = topic_of(topic(backport("event-notification", odd, "").as_bytes()).unwrap());
        let numbers: Vec<Option<i64>> = t.events.iter().map(|e| e.number).collect();
        assert_eq!(numbers, vec![None, None, None, Some(5)]);
        assert!(post(backport("mystery", "", "").as_bytes(), None).is_err(), "an unknown type is refused");
    }

    #[test]
    fn what_is_refused() {
        let table: &[(Result<Notification, NotUnderstood>, &str)] = &[
            (rest_hook("PUT", "Patient", "p1", br#"{"resourceType":"Patient","id":"p2"}"#), "URL says"),
            (rest_hook("PUT", "Patient", "..", b"{}"), "not {Type}/{id}"),
            (rest_hook("PUT", "Patient", "p1", b"<html/>"), "not a JSON resource"),
            (post(b"{}", Some("../../x")), "not Type/id"),
            (post(br#"{"resourceType":"Bundle","type":"transaction"}"#, None), "not a subscription notification"),
            (post(br#"{"resourceType":"Patient","id":"../x"}"#, None), "not valid FHIR"),
            (post(br#"{"id":"x"}"#, None), "not a FHIR resource"),
        ];
        for (r, want) in table {
            let e = r.clone().unwrap_err();
            assert!(e.0.contains(want), "{e} / {want}");
        }
        let many = format!(
            r#"{{"resourceType":"Bundle","type":"history","entry":[{}]}}"#,
            vec![r#"{"resource":{"resourceType":"Parameters"}}"#; MAX_ENTRIES + 1].join(",")
        );
        assert!(post(many.as_bytes(), None).is_err());
    }
}
