//! What a FhirSubscriptionSync wants on its source: Subscriptions that PUT into Pathling (Direct), or
//! that notify fhirsync's receiver (Relay) — classic criteria Subscriptions, or topic-based ones on
//! topics found or created for each resource type. In Relay mode it also configures the relay, before
//! the Subscriptions exist (a source handshakes at once).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use jiff::Timestamp;

use super::Context;
use crate::api::conditions::{set_condition, types};
use crate::api::validate::server_timing;
use crate::api::{
    Delivery, FhirSubscriptionSync, FhirSubscriptionSyncSpec, FhirSubscriptionSyncStatus, SubscriptionState,
};
use crate::fhir::client::{Error as HttpError, HttpClient};
use crate::fhir::subscription::topic::TopicClient;
use crate::fhir::subscription::{
    Capabilities, Desired, How, SubscriptionClient, Tag, TopicStyle, criteria_parts, header_lines,
};
use crate::pathling::PathlingClient;
use crate::relay::notify::Content;
use crate::relay::{Relay, SyncConfig};
use crate::run::resolve;

/// How long a Subscription may stay `requested` before the sync says so.
pub const REQUESTED_MAX: Duration = Duration::from_secs(300);

/// The Subscriptions a sync wants, and what they need (made by [`prepare`]).
pub struct Plan {
    pub desired: Vec<Desired>,
    /// `rest-hook`, `topic` or `medplum`.
    pub kind: &'static str,
    /// The source's topics, for topic-based sources.
    pub topics: Option<TopicClient>,
    /// The topics in use.
    pub topic_urls: Vec<String>,
    by_criteria: HashMap<String, String>,
}

impl Plan {
    /// The topic a criteria's Subscription is on.
    pub fn topic_of(&self, criteria: &str) -> Option<String> {
        self.by_criteria.get(criteria).cloned()
    }
}

type Refusal = (String, String);

fn refuse(reason: &str, msg: impl Into<String>) -> Refusal {
    (reason.to_string(), msg.into())
}

/// Reads `headersRef` (Direct).
async fn direct_headers(ctx: &Context, obj: &FhirSubscriptionSync) -> Result<Vec<String>, Refusal> {
    let ns = obj.metadata.namespace.clone().unwrap_or_default();
    let Some(r) = &obj.spec.headers_ref else { return Ok(vec![]) };
    let raw = ctx.secrets.get(&ns, r).await.map_err(|e| refuse("AuthFailed", format!("spec.headersRef: {e}")))?;
    String::from_utf8(raw).map_err(|_| "is not UTF-8 text".to_string()).and_then(|t| header_lines(&t)).map_err(|why| {
        refuse("InvalidSpec", format!("Secret {ns}/{} key {:?} (spec.headersRef): {why}", r.name, r.key))
    })
}

/// Prepares what the sync wants on its source, and acts to make it possible: reads `headersRef`
/// (Direct), configures the relay (Relay), finds or creates the topics (topic-based sources).
pub async fn prepare(
    ctx: &Context,
    obj: &FhirSubscriptionSync,
    caps: &Capabilities,
    source: &HttpClient,
) -> Result<Plan, Refusal> {
    let spec = &obj.spec;
    let ns = obj.metadata.namespace.clone().unwrap_or_default();
    let name = obj.metadata.name.clone().unwrap_or_default();
    let reason = format!("fhirsync {ns}/{name}: deliver changes into Pathling");
    let end = spec.end.as_ref().map(|t| t.0.to_string());
    let simple = |endpoint: &str, headers: &[String], send_deletes: bool| -> Vec<Desired> {
        spec.criteria
            .iter()
            .map(|c| Desired {
                criteria: c.clone(),
                endpoint: endpoint.to_string(),
                headers: headers.to_vec(),
                send_deletes,
                end: end.clone(),
                reason: reason.clone(),
                how: How::Criteria,
            })
            .collect()
    };
    if spec.delivery == Delivery::Direct {
        ctx.relay.forget(&ns, &name);
        let headers = direct_headers(ctx, obj).await?;
        let endpoint = spec.endpoint.clone().unwrap_or_default();
        return Ok(Plan {
            desired: simple(&endpoint, &headers, spec.send_deletes),
            kind: "rest-hook",
            topics: None,
            topic_urls: vec![],
            by_criteria: HashMap::new(),
        });
    }
    let (endpoint, headers, content) = configure_relay(ctx, obj, source).await?;
    let Some(style) = caps.topics else {
        let kind = if crate::fhir::quirks::posts_resources(&caps.software) { "medplum" } else { "rest-hook" };
        return Ok(Plan {
            desired: simple(&endpoint, &headers, spec.send_deletes),
            kind,
            topics: None,
            topic_urls: vec![],
            by_criteria: HashMap::new(),
        });
    };
    // topic-based: one topic per resource type, filterable by every parameter its criteria use
    let mut by_type: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for c in &spec.criteria {
        let (t, params) = criteria_parts(c).ok_or_else(|| {
            refuse(
                "InvalidSpec",
                format!("criteria {c:?} names no single resource type: a topic-based source needs Type or Type?params"),
            )
        })?;
        let e = by_type.entry(t).or_default();
        for p in params {
            if !e.contains(&p) {
                e.push(p);
            }
        }
    }
    let uid = obj.metadata.uid.clone().unwrap_or_default();
    let topics = TopicClient::new(source.clone(), style);
    let tag = super::subscription_sync::owner_tag(obj);
    let mut urls: HashMap<String, String> = HashMap::new();
    for (t, params) in &by_type {
        let new_url = format!("https://fhirsync.io/topic/{uid}/{t}");
        let topic = topics.ensure(&tag, t, params, &new_url).await.map_err(|e| {
            let hint = if crate::fhir::class::refuses(&e, crate::fhir::class::Ask::Create) {
                " — the source refused the topic: create a topic for this type on it (with create, update and delete triggers), and fhirsync uses it"
            } else {
                ""
            };
            refuse("SubscriptionError", format!("the SubscriptionTopic for {t}: {e}{hint}"))
        })?;
        urls.insert(t.clone(), topic.url);
    }
    let mut by_criteria = HashMap::new();
    let desired = spec
        .criteria
        .iter()
        .map(|c| {
            let (t, params) = criteria_parts(c).unwrap_or_default();
            let topic = urls.get(&t).cloned().unwrap_or_default();
            by_criteria.insert(c.clone(), topic.clone());
            Desired {
                criteria: c.clone(),
                endpoint: endpoint.clone(),
                headers: headers.clone(),
                send_deletes: false,
                end: end.clone(),
                reason: reason.clone(),
                how: How::Topic {
                    style,
                    topic,
                    filter: (!params.is_empty()).then(|| c.clone()),
                    content: content.code(),
                },
            }
        })
        .collect();
    Ok(Plan { desired, kind: "topic", topics: Some(topics), topic_urls: urls.into_values().collect(), by_criteria })
}

/// Relay mode: configures the relay for the sync (kept as is when nothing changed); returns the
/// endpoint, the `channel.header` lines and the content its Subscriptions use.
pub async fn configure_relay(
    ctx: &Context,
    obj: &FhirSubscriptionSync,
    source: &HttpClient,
) -> Result<(String, Vec<String>, Content), Refusal> {
    let spec = &obj.spec;
    let ns = obj.metadata.namespace.clone().unwrap_or_default();
    let name = obj.metadata.name.clone().unwrap_or_default();
    let Some(receiver) = &ctx.receiver_url else {
        return Err(refuse(
            "ReceiverNotConfigured",
            "delivery Relay needs the operator's receiver: run it with --receiver-addr and --receiver-url (the chart's receiver.enabled)",
        ));
    };
    let target = spec.target.as_ref().ok_or_else(|| refuse("InvalidSpec", "delivery Relay needs spec.target"))?;
    let timing = server_timing(target, "spec.target").map_err(|e| refuse("InvalidSpec", e.join("; ")))?;
    let pathling = resolve::http_client(target, &timing, &ns, ctx.secrets.as_ref(), "spec.target")
        .await
        .map_err(|f| refuse(f.failure.reason.as_str(), f.failure.message))?;
    let uid = obj.metadata.uid.clone().unwrap_or_default();
    let endpoint = format!("{}{}", receiver.as_str().trim_end_matches('/'), Relay::path(&ns, &name));
    let headers = vec![format!("Authorization: Bearer {}", ctx.relay.token(&uid))];
    // a source may send full resources only to an https endpoint (Helios): ask for them there
    let content = if receiver.scheme() == "https" { Content::FullResource } else { Content::IdOnly };
    // changed Secrets (a rotated token for Pathling or the source) make new clients
    let fingerprint = crate::sync::fingerprint(&format!(
        "{}|{}|{}|{}|{}|{}|{}",
        serde_json::to_string(&spec.source).unwrap_or_default(),
        serde_json::to_string(target).unwrap_or_default(),
        serde_json::to_string(&spec.catch_up).unwrap_or_default(),
        content.code(),
        uid,
        source.credential_digest(),
        pathling.client.credential_digest(),
    ));
    ctx.relay.configure(SyncConfig {
        namespace: ns.clone(),
        name: name.clone(),
        uid: uid.clone(),
        source: source.clone(),
        pathling: PathlingClient::new(pathling.client),
        catch_up: spec.catch_up.as_ref().map(|c| c.bulk_export_sync_ref.name.clone()),
        fingerprint,
        last_events: obj
            .status
            .as_ref()
            .and_then(|s| s.relay.as_ref())
            .map(|r| r.last_event_numbers.clone())
            .unwrap_or_default(),
    });
    Ok((endpoint, headers, content))
}

/// What to say when Subscriptions stay `requested` too long.
pub fn stuck(subs: &[SubscriptionState], now: Timestamp, delivery: Delivery) -> Option<String> {
    let stuck: Vec<&SubscriptionState> = subs
        .iter()
        .filter(|s| s.status == "requested")
        .filter(|s| {
            s.since.as_ref().is_some_and(|t| now.duration_since(t.0).as_secs_f64() > REQUESTED_MAX.as_secs_f64())
        })
        .collect();
    let first = stuck.first()?;
    let check = match delivery {
        Delivery::Direct => {
            "that it can reach spec.endpoint, that it runs rest-hook Subscriptions (HAPI: hapi.fhir.subscription.resthook_enabled), \
             and that it is not topic-based (then use spec.delivery: Relay)"
        }
        Delivery::Relay => {
            "that it can reach the receiver (--receiver-url), that the receiver answers (its handshake reached fhirsync?), \
             and the source's own logs for the Subscription"
        }
    };
    Some(format!(
        "{} Subscription(s) stayed requested for more than {} minutes (first: {:?}, Subscription/{}); check {check}",
        stuck.len(),
        REQUESTED_MAX.as_secs() / 60,
        first.criteria,
        first.id.clone().unwrap_or_default()
    ))
}

/// Relay mode: a `Degraded` condition when the relay missed changes and no catch-up is configured.
pub fn missed_condition(st: &mut FhirSubscriptionSyncStatus, spec: &FhirSubscriptionSyncSpec, gen_: Option<i64>) {
    let Some(r) = &st.relay else { return };
    let Some(missed) = &r.last_missed else { return };
    if spec.catch_up.is_some() {
        return;
    }
    let when = r.last_missed_time.as_ref().map(|t| format!(" (at {})", t.0)).unwrap_or_default();
    let msg = format!(
        "the relay missed changes{when}: {missed}. Set spec.catchUp.bulkExportSyncRef to a BulkExportSync of the same source and target, or run one now"
    );
    set_condition(&mut st.conditions, types::DEGRADED, true, "ChangesMissed", msg, gen_);
}

/// Removes every owned Subscription and topic from the source; returns how many.
pub async fn remove_all(http: HttpClient, tag: &Tag) -> Result<usize, HttpError> {
    let mut n = SubscriptionClient::new(http.clone()).remove_all(tag).await?;
    for style in [TopicStyle::BackportBasic, TopicStyle::R5] {
        n += TopicClient::new(http.clone(), style).remove_owned(tag, &[]).await?;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    use super::*;
    use crate::api::RelayStatus;

    fn sub(status: &str, since_secs_ago: Option<i64>, now: Timestamp) -> SubscriptionState {
        SubscriptionState {
            criteria: "Patient?".into(),
            id: Some("s1".into()),
            status: status.into(),
            since: since_secs_ago.map(|s| Time(now - jiff::SignedDuration::from_secs(s))),
            ..Default::default()
        }
    }

    #[test]
    fn a_subscription_requested_too_long_is_named_with_what_to_check() {
        let now = Timestamp::now();
        let table: &[(&str, Option<i64>, Delivery, Option<&str>)] = &[
            ("requested", Some(60), Delivery::Direct, None),
            ("requested", None, Delivery::Direct, None),
            ("active", Some(3600), Delivery::Direct, None),
            ("requested", Some(301), Delivery::Direct, Some("spec.delivery: Relay")),
            ("requested", Some(301), Delivery::Relay, Some("--receiver-url")),
        ];
        for (status, ago, delivery, want) in table {
            let got = stuck(&[sub(status, *ago, now)], now, *delivery);
            match want {
                None => assert_eq!(got, None, "{status} {ago:?}"),
                Some(w) => {
                    let m = got.unwrap_or_default();
                    assert!(m.contains(w) && m.contains("Subscription/s1") && m.contains("5 minutes"), "{m}");
                }
            }
        }
    }

    #[test]
    fn missed_changes_are_a_condition_only_without_a_catch_up() {
        let spec: FhirSubscriptionSyncSpec = serde_json::from_value(serde_json::json!({
            "source": {"url": "https://s.example"}, "delivery": "Relay",
            "target": {"url": "https://p.example/fhir"}, "criteria": ["Patient?"]}))
        .unwrap();
        let mut with_catch_up = spec.clone();
        with_catch_up.catch_up =
            serde_json::from_value(serde_json::json!({"bulkExportSyncRef": {"name": "n"}})).unwrap();
        let relay = RelayStatus {
            last_missed: Some("Subscription/s1: events 3–4 never arrived".into()),
            ..Default::default()
        };
        let table = [
            (&spec, None, false),
            (&spec, Some(relay.clone()), true),
            (&with_catch_up, Some(relay.clone()), false),
            (&spec, Some(RelayStatus::default()), false),
        ];
        for (spec, relay, degraded) in table {
            let mut st = FhirSubscriptionSyncStatus { relay, ..Default::default() };
            missed_condition(&mut st, spec, Some(1));
            let c = st.conditions.iter().find(|c| c.type_ == types::DEGRADED);
            assert_eq!(c.is_some_and(|c| c.reason == "ChangesMissed" && c.status == "True"), degraded, "{c:?}");
            if degraded {
                let m = &c.unwrap().message;
                assert!(m.contains("events 3–4") && m.contains("spec.catchUp.bulkExportSyncRef"), "{m}");
            }
        }
    }
}
